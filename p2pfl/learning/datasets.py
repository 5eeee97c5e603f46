"""Datasets, offline first: each is loaded once into shared tensors.

A simulation of thousands of peers must not hold thousands of copies of the data: a
loaded ``Dataset`` keeps the whole training set as one tensor, peers hold index arrays
into it (see ``partition``), and ``load_dataset`` hands the same object to every caller
that asks for the same thing. Treat its tensors as read-only.

- ``digits``: scikit-learn's 8x8 digits, shipped with scikit-learn; always available.
- ``mnist``, ``fashion_mnist``: the four standard IDX ``.gz`` files in
  ``<data_dir>/<name>/``, checksum-verified; ``p2pfl data fetch NAME`` puts them there.
- ``synthetic``: a small Gaussian-mixture task drawn from a seed, with a ``sources``
  attribute (the "writer" of each sample) for the by-source partitioner; for tests.
- your own: ``module:factory`` or ``path/file.py:factory`` (see :mod:`p2pfl.plugins`),
  called with the seed and the data directory, its arrays checked by
  :meth:`Dataset.from_arrays`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.errors import P2PFLError
from p2pfl.learning.idx import IdxError, parse_idx, payload_md5, read_payload

__all__ = [
    "DATASETS",
    "IDX_DATASETS",
    "Dataset",
    "DatasetUnavailable",
    "IdxFile",
    "clear_dataset_cache",
    "default_data_dir",
    "find_idx_file",
    "load_dataset",
]


@dataclass(frozen=True)
class IdxFile:
    """One file of an IDX dataset: its canonical name and the md5 of its decompressed bytes."""

    name: str
    md5: str

    @property
    def gz_name(self) -> str:
        return f"{self.name}.gz"


def _idx_files(md5s: tuple[str, str, str, str]) -> tuple[IdxFile, ...]:
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    return tuple(IdxFile(n, m) for n, m in zip(names, md5s, strict=True))


# md5 of the decompressed payloads. These match the canonical .gz files (MNIST
# f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...; Fashion-MNIST 8d4fb7e6...,
# 25c81989..., bef4ecab..., bb300cfd...) and every repackaging of them.
IDX_DATASETS: dict[str, tuple[IdxFile, ...]] = {
    "mnist": _idx_files(
        (
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        )
    ),
    "fashion_mnist": _idx_files(
        (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        )
    ),
}

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "synthetic")


class DatasetUnavailable(P2PFLError, RuntimeError):
    """A dataset's files are missing or corrupt; the message says how to fetch them."""


@dataclass
class Dataset:
    """A classification dataset held in memory as shared tensors.

    ``x_*`` are float32 of shape ``(N, *input_shape)``, ``y_*`` int64 of shape ``(N,)``.
    ``sources`` (int64, one per training sample) says which natural source (writer,
    device, book) a sample came from, where the dataset has such a notion.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    sources: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: Any,
        y_train: Any,
        x_test: Any,
        y_test: Any,
        num_classes: int | None = None,
    ) -> Dataset:
        """A dataset from arrays (numpy or torch): features ``(N, *input_shape)`` as float32,
        labels ``(N,)`` as int64 in ``0..num_classes-1`` (default: the largest label + 1).
        ``ValueError`` naming the array for anything else."""
        xs = [_features(x, f"x_{part}") for x, part in ((x_train, "train"), (x_test, "test"))]
        ys = [_labels(y, f"y_{part}") for y, part in ((y_train, "train"), (y_test, "test"))]
        for x, y, part in zip(xs, ys, ("train", "test"), strict=True):
            if len(x) != len(y):
                raise ValueError(f"x_{part} has {len(x)} samples but y_{part} has {len(y)}")
            if len(x) == 0:
                raise ValueError(f"x_{part} is empty")
        if xs[0].shape[1:] != xs[1].shape[1:]:
            raise ValueError(
                f"x_train samples are {tuple(xs[0].shape[1:])}, x_test's {tuple(xs[1].shape[1:])}"
            )
        top = int(max(int(ys[0].max()), int(ys[1].max()))) + 1
        classes = top if num_classes is None else int(num_classes)
        if classes < 2 or top > classes:
            raise ValueError(
                f"labels must lie in 0..num_classes-1 with num_classes >= 2 (got {classes}, largest label {top - 1})"
            )
        return cls(name, xs[0], ys[0], xs[1], ys[1], classes, tuple(xs[0].shape[1:]))

    @property
    def train_labels(self) -> np.ndarray:
        """Training labels as a numpy array (a view, not a copy): what partitioners take."""
        return self.y_train.numpy()

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"classes={self.num_classes}, input_shape={self.input_shape})"
        )


def default_data_dir() -> Path:
    """``$P2PFL_DATA_DIR`` if set, else ``~/.cache/p2pfl/data``."""
    env = os.environ.get("P2PFL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "p2pfl" / "data"


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    normalize: bool = False,
    verify: bool = True,
) -> Dataset:
    """Load dataset ``name``; repeated calls with the same arguments share one object.

    ``seed`` picks digits' train/test split and synthetic's draw; MNIST-style datasets
    have a fixed standard split. Images are scaled to [0, 1]; ``normalize`` further
    standardises them with the training set's mean and standard deviation. ``verify``
    checks the IDX payloads' md5 against the canonical values (turn it off only for
    hand-made files). Raises ``DatasetUnavailable`` when files are missing or corrupt.
    """
    if ":" in name:  # the user's own factory (p2pfl.plugins): given the seed and data_dir
        return _load_cached(
            name, str(data_dir) if data_dir is not None else "", int(seed), normalize, verify
        )
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if name in IDX_DATASETS:
        # Only IDX datasets depend on the directory: keep it out of the others' cache key.
        return _load_cached(name, str(directory.expanduser().resolve()), 0, normalize, verify)
    return _load_cached(name, "", int(seed), normalize, verify)


def clear_dataset_cache() -> None:
    """Forget loaded datasets (e.g. after files in the data directory changed)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, directory: str, seed: int, normalize: bool, verify: bool) -> Dataset:
    if ":" in name:
        ds = _load_custom(name, directory or None, seed)
    elif name == "digits":
        ds = _load_digits(seed)
    elif name == "synthetic":
        ds = _load_synthetic(seed)
    else:
        ds = _load_idx_dataset(name, Path(directory), verify)
    if normalize:
        mean, std = ds.x_train.mean(), ds.x_train.std().clamp_min(1e-8)
        ds.x_train = (ds.x_train - mean) / std
        ds.x_test = (ds.x_test - mean) / std
    return ds


def _features(value: Any, what: str) -> torch.Tensor:
    array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    if array.ndim < 2 or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(
            f"{what} must be a numeric array (N, ...), got {array.dtype} {array.shape}"
        )
    out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} holds NaN or Inf")
    return torch.from_numpy(out)


def _labels(value: Any, what: str) -> torch.Tensor:
    array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    if (
        array.ndim != 1
        or not np.issubdtype(array.dtype, np.integer)
        or (array.size and array.min() < 0)
    ):
        raise ValueError(
            f"{what} must be integer labels >= 0 of shape (N,), got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _load_custom(path: str, data_dir: str | None, seed: int) -> Dataset:
    """The user's dataset factory (``p2pfl.plugins``), its result checked."""
    from p2pfl.plugins import DATASET_CONTRACT, FactoryError, load_factory

    where = f"data.dataset={path!r}"
    factory = load_factory(path, "data.dataset")
    try:
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    except (TypeError, ValueError):  # no signature (a builtin): give it everything
        accepted, takes_any = {}, True  # type: ignore[assignment]
    offered = {"seed": seed, "data_dir": data_dir}
    kwargs = {k: v for k, v in offered.items() if takes_any or k in accepted}
    try:
        result = factory(**kwargs)
    except Exception as error:
        raise FactoryError(
            f"{where}: the factory raised {_one_line(error)}; {DATASET_CONTRACT}"
        ) from None
    if isinstance(result, Dataset):
        result = {
            "name": result.name,
            "x_train": result.x_train,
            "y_train": result.y_train,
            "x_test": result.x_test,
            "y_test": result.y_test,
            "num_classes": result.num_classes,
            "sources": result.sources,
        }
    if not isinstance(result, Mapping):
        raise FactoryError(f"{where}: it returned a {type(result).__name__}; {DATASET_CONTRACT}")
    needed = ("x_train", "y_train", "x_test", "y_test")
    missing = [key for key in needed if key not in result]
    if missing:
        raise FactoryError(f"{where}: it returned no {', '.join(missing)}; {DATASET_CONTRACT}")
    try:
        dataset = Dataset.from_arrays(
            str(result.get("name") or path),
            result["x_train"],
            result["y_train"],
            result["x_test"],
            result["y_test"],
            num_classes=result.get("num_classes"),
        )
    except ValueError as error:
        raise FactoryError(f"{where}: {error}; {DATASET_CONTRACT}") from None
    sources = result.get("sources")
    if sources is not None:
        dataset.sources = np.asarray(sources, dtype=np.int64)
        if dataset.sources.shape != (len(dataset.y_train),):
            raise FactoryError(f"{where}: sources must hold one int per training sample")
    return dataset


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load_digits(seed: int) -> Dataset:
    x_tr, x_te, y_tr, y_te = _digits_split(seed)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


#: arrays of one digits split, as saved (and checked when read back)
_DIGITS_SPLIT = {"x_train": (1437, 1, 8, 8), "x_test": (360, 1, 8, 8), "y_train": (1437,), "y_test": (360,)}


def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, split 80/20 stratified by ``seed``: from a saved copy when
    there is one, since importing scikit-learn costs a node ~80 MB of memory for 1,797
    tiny images. The copy is written on first use (best effort) and checked on read."""
    cache = default_data_dir() / "digits" / f"split-{seed}.npz"
    try:
        with np.load(cache, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in _DIGITS_SPLIT}
        if all(arrays[k].shape == shape for k, shape in _DIGITS_SPLIT.items()):
            return arrays["x_train"], arrays["x_test"], arrays["y_train"], arrays["y_test"]
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: computed again below
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed, shuffle=True
    )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}")
        with open(partial, "wb") as handle:
            np.savez(handle, x_train=x_tr, x_test=x_te, y_train=y_tr, y_test=y_te)
        os.replace(partial, cache)
    except OSError:
        pass  # a read-only data directory: computed each time, as before
    return x_tr, x_te, y_tr, y_te


# Synthetic task: 4 classes in 64 dimensions (shaped 1x8x8 so every model fits), drawn by
# 8 sources that each shift the features and favour some labels (feature and label skew).
_SYN_CLASSES, _SYN_SOURCES, _SYN_PER_SOURCE, _SYN_TEST = 4, 8, 150, 400


def _load_synthetic(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    dim = 64
    means = rng.normal(0.0, 0.45, size=(_SYN_CLASSES, dim))
    shifts = rng.normal(0.0, 0.2, size=(_SYN_SOURCES, dim))
    label_mix = rng.dirichlet(np.ones(_SYN_CLASSES), size=_SYN_SOURCES)

    sources = np.repeat(np.arange(_SYN_SOURCES), _SYN_PER_SOURCE)
    y_train = np.concatenate(
        [
            rng.choice(_SYN_CLASSES, size=_SYN_PER_SOURCE, p=label_mix[s])
            for s in range(_SYN_SOURCES)
        ]
    )
    x_train = means[y_train] + shifts[sources] + rng.normal(size=(len(y_train), dim))
    test_sources = rng.integers(_SYN_SOURCES, size=_SYN_TEST)
    y_test = rng.integers(_SYN_CLASSES, size=_SYN_TEST)
    x_test = means[y_test] + shifts[test_sources] + rng.normal(size=(_SYN_TEST, dim))

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32).reshape(-1, 1, 8, 8))

    return Dataset(
        name="synthetic",
        x_train=images(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=images(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=_SYN_CLASSES,
        input_shape=(1, 8, 8),
        sources=sources.astype(np.int64),
    )


def _fetch_hint(name: str) -> str:
    return f"run `p2pfl data fetch {name}` to download it"


def find_idx_file(folder: Path, file: IdxFile) -> Path | None:
    """The path of ``file`` in ``folder`` (``.gz`` preferred, plain accepted), if present."""
    for candidate in (folder / file.gz_name, folder / file.name):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(folder: Path, name: str, file: IdxFile, verify: bool) -> np.ndarray:
    path = find_idx_file(folder, file)
    if path is None:
        raise DatasetUnavailable(
            f"dataset {name!r} is not in {folder} (missing {file.gz_name}); {_fetch_hint(name)}"
        )
    try:
        data = read_payload(path)
        if verify and payload_md5(data) != file.md5:
            raise DatasetUnavailable(
                f"{path} fails its checksum (corrupt or not the canonical file); "
                f"delete it and {_fetch_hint(name)}"
            )
        return parse_idx(data)
    except IdxError as exc:
        where = "" if str(path) in str(exc) else f"{path}: "
        raise DatasetUnavailable(f"{where}{exc}; delete it and {_fetch_hint(name)}") from None


def _load_idx_dataset(name: str, data_dir: Path, verify: bool) -> Dataset:
    folder = data_dir / name
    train_x, train_y, test_x, test_y = (
        _read_verified(folder, name, f, verify) for f in IDX_DATASETS[name]
    )
    for pixels, labels in ((train_x, train_y), (test_x, test_y)):
        if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
            raise DatasetUnavailable(
                f"{folder}: images {pixels.shape} and labels {labels.shape} do not match; "
                f"{_fetch_hint(name)}"
            )

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a).unsqueeze(1).to(torch.float32)
        return x.div_(255.0)

    y_train = torch.from_numpy(train_y.astype(np.int64))
    y_test = torch.from_numpy(test_y.astype(np.int64))
    return Dataset(
        name=name,
        x_train=images(train_x),
        y_train=y_train,
        x_test=images(test_x),
        y_test=y_test,
        num_classes=10,
        input_shape=(1, *train_x.shape[1:]),
    )
