"""The garbage collector while a command starts (p2pfl/gcstartup.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from p2pfl import gcstartup


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, ...]]:
    """A module that has not started yet; the collector's thresholds put back after."""
    monkeypatch.setattr(gcstartup, "_defaults", None)
    monkeypatch.setattr(gcstartup, "_began", False)
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        yield before
    finally:
        gc.set_threshold(*before)
        if gc.get_freeze_count() != frozen:
            gc.unfreeze()  # (pytest's own objects back in the collector's sight)


def test_starting_raises_the_youngest_threshold_and_started_puts_it_back(
    fresh: tuple[int, ...],
) -> None:
    gcstartup.starting()
    assert gc.get_threshold() == (gcstartup.STARTING_THRESHOLD, *fresh[1:])
    gcstartup.starting()  # a second call changes nothing (it would record raised values)
    assert gc.get_threshold() == (gcstartup.STARTING_THRESHOLD, *fresh[1:])
    gcstartup.started()
    assert gc.get_threshold() == fresh
    gcstartup.started()  # and a second one neither
    assert gc.get_threshold() == fresh
    gcstartup.starting()  # nor starting again once started
    assert gc.get_threshold() == fresh


def test_started_with_freeze_moves_what_start_up_built_out_of_the_collectors_sight(
    fresh: tuple[int, ...],
) -> None:
    gcstartup.starting()
    built = [[index] for index in range(1000)]  # what a node builds and keeps
    if gc.get_freeze_count():
        pytest.skip("this process froze objects already")
    gcstartup.started(freeze=True)
    assert gc.get_threshold() == fresh
    assert gc.get_freeze_count() >= len(built)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gcstartup.started(freeze=True)  # a second call freezes nothing
    assert gc.get_freeze_count() == 0


def test_imported_freezes_what_the_imports_built_and_keeps_the_raised_threshold(
    fresh: tuple[int, ...],
) -> None:
    if gc.get_freeze_count():
        pytest.skip("this process froze objects already")
    gcstartup.imported()  # not starting: nothing
    assert gc.get_freeze_count() == 0
    gcstartup.starting()
    gcstartup.imported()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert gc.get_threshold() == (gcstartup.STARTING_THRESHOLD, *fresh[1:])
    built = [[index] for index in range(1000)]  # what a simulation builds: not frozen
    gcstartup.started()
    assert gc.get_threshold() == fresh
    assert gc.get_freeze_count() == frozen
    gcstartup.imported()  # once started: nothing
    assert gc.get_freeze_count() == frozen
    assert len(built) == 1000


def test_started_without_starting_leaves_the_collector_alone(fresh: tuple[int, ...]) -> None:
    gc.set_threshold(1234, 5, 6)  # a host's own settings (a library user, a test)
    frozen = gc.get_freeze_count()
    gcstartup.started(freeze=True)
    assert gc.get_threshold() == (1234, 5, 6)
    assert gc.get_freeze_count() == frozen


_IMPORTS = """
import gc, sys
from p2pfl import gcstartup
if sys.argv[1] == "starting":
    gcstartup.starting()
import torch, p2pfl.node, p2pfl.transport.libp2p
print(gc.get_stats()[2]["collections"])
"""


def _full_collections(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return int(done.stdout.split()[-1])


def test_no_full_collection_while_a_node_imports() -> None:
    """What ``p2pfl node`` imports costs full collections under CPython's thresholds
    (4 on 3.11, ~0.27 s of CPU) and none while starting."""
    assert _full_collections("default") >= 1, "CPython no longer collects here: the module is moot"
    assert _full_collections("starting") == 0
