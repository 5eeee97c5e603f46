"""Your own model and dataset: factories named by an import path in the configuration.

``model.name`` and ``data.dataset`` take, besides the built-in names, a factory written
``module:attribute`` (an importable module, e.g. ``mypkg.models:SmallCNN``) or
``path/to/file.py:attribute`` (a file, relative to the working directory). The factory
must return:

- model: ``factory(input_shape, num_classes, **model.params)`` -> a ``torch.nn.Module``
  with parameters and no buffers (no BatchNorm: a peer's model is a pure function of its
  parameter vector), mapping a batch ``(B, *input_shape)`` to logits ``(B, num_classes)``;
- dataset: ``factory(seed=..., data_dir=...)`` -> a :class:`p2pfl.learning.Dataset`, or a
  mapping with the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (features as
  floats, ``(N, *input_shape)``; labels as integers ``0..C-1``), optionally
  ``num_classes`` and ``name``.

The configuration checks what it can without running anything: the path's form, that
the module imports and that the attribute is callable. What the factory returns is
checked when the peers are built; either way the error is one line that names the key and
says what the factory must return.

The user's code is imported only when a factory is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.config import ConfigError
from p2pfl.learning.datasets import DatasetUnavailable

__all__ = [
    "DATASET_CONTRACT",
    "MODEL_CONTRACT",
    "FactoryError",
    "is_factory_path",
    "load_factory",
]

MODEL_CONTRACT = (
    "factory(input_shape, num_classes, **model.params) must return a torch.nn.Module with "
    "parameters and no buffers that maps (B, *input_shape) to logits (B, num_classes)"
)
DATASET_CONTRACT = (
    "factory(seed=..., data_dir=...) must return a p2pfl.learning.Dataset or a dict of "
    "arrays x_train, y_train, x_test, y_test (float features (N, ...), integer labels 0..C-1)"
)

_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class FactoryError(ConfigError, DatasetUnavailable):
    """A user factory that cannot be loaded or returned something unusable (one line).

    A configuration error; also a :class:`~p2pfl.learning.DatasetUnavailable` (the peers
    cannot be set up), because that is what the drivers' command lines report as one line
    when the peers are built (the ``sim`` command does not catch every ``ConfigError``).
    """


def is_factory_path(name: str) -> bool:
    """Whether a model or dataset name is a factory path rather than a built-in name."""
    return ":" in name


def load_factory(path: str, key: str = "") -> Callable[..., Any]:
    """The callable ``path`` names; ``FactoryError`` (naming ``key``, when given) if none."""
    where = f"{key}={path!r}: " if key else ""
    source, sep, attribute = path.rpartition(":")
    if not sep or not source or not _ATTRIBUTE.fullmatch(attribute):
        raise FactoryError(f"{where}expected module:factory or path/to/file.py:factory")
    module = _module(source, where)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise FactoryError(f"{where}{source} has no attribute {attribute!r}") from None
    if not callable(target):
        raise FactoryError(f"{where}{attribute} is not callable")
    return target


def _module(source: str, where: str) -> Any:
    if source.endswith(".py") or "/" in source or "\\" in source:
        file = Path(source).expanduser().resolve()
        if not file.is_file():
            raise FactoryError(f"{where}no such file {source}")
        # one module per file, under a name no import statement could collide with
        name = f"_p2pfl_user_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise FactoryError(f"{where}cannot load {source} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise FactoryError(f"{where}importing {source} failed: {_one_line(error)}") from None
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as error:
        cwd = str(Path.cwd())
        missing = error.name is not None and source.split(".")[0] == error.name.split(".")[0]
        if not missing or cwd in sys.path:
            raise FactoryError(f"{where}importing {source} failed: {_one_line(error)}") from None
    except Exception as error:
        raise FactoryError(f"{where}importing {source} failed: {_one_line(error)}") from None
    sys.path.append(cwd)  # the working directory, as ``python -m`` would search it
    try:
        return importlib.import_module(source)
    except Exception as error:
        raise FactoryError(f"{where}importing {source} failed: {_one_line(error)}") from None
    finally:
        sys.path.remove(cwd)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
