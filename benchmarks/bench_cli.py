"""Bad input to a benchmark script: one line on stderr and exit status 2, not a traceback.

Most scripts load a dataset (MNIST by default), which a fresh machine has not fetched
(``p2pfl data fetch mnist``). :func:`run` runs a script's ``main`` so that a dataset that
is not there, or a name that is no dataset, is said in one line. A script that does its
work in child processes calls :func:`require_dataset` in the parent first: a child's
failure would reach the parent as its exit status and a traceback on its stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["BadInput", "require_dataset", "run"]


class BadInput(Exception):
    """Input the script cannot run with; the message is one line for the user."""


def require_dataset(name: str) -> None:
    """``BadInput`` unless dataset ``name`` can be loaded: a dataset's name, its files
    fetched and intact (checked, not loaded: the parent of a script's children need not
    hold it)."""
    from p2pfl.learning.datasets import DATASETS
    from p2pfl.learning.fetch import verify_dataset

    if name not in DATASETS:
        raise BadInput(f"--dataset: {name!r} is not a dataset; choose one of {', '.join(DATASETS)}")
    bad = verify_dataset(name)
    if bad:
        raise BadInput(
            f"--dataset: {name} is not fetched (missing or damaged: {', '.join(bad)}); "
            f"run `p2pfl data fetch {name}`"
        )


def run(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())``, with a dataset that is not fetched, or ``BadInput``, as one
    line on stderr and exit status 2."""
    from p2pfl.learning import DatasetUnavailable

    try:
        code = main()
    except (BadInput, DatasetUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
