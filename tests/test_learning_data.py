"""Datasets, IDX files and fetching: loaders on hand-made files, never on downloads."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.learning import (
    DatasetUnavailable,
    FetchError,
    default_data_dir,
    fetch_dataset,
    load_dataset,
)
from p2pfl.learning.datasets import IDX_DATASETS, IdxFile, clear_dataset_cache, find_idx_file
from p2pfl.learning.fetch import Source, verify_dataset
from p2pfl.learning.idx import IdxError, parse_idx, payload_md5, read_idx, write_idx

IDX_NAMES = [f.name for f in IDX_DATASETS["mnist"]]


def _tiny_idx_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=20).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=6).astype(np.uint8),
    }


def _write_tiny(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / f"{name}.gz", array)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_dataset_cache()
    yield
    clear_dataset_cache()


# ------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, dtype: type, suffix: str) -> None:
    array: np.ndarray = (np.arange(24).reshape(2, 3, 4) % 100).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_idx_rejects_malformed() -> None:
    with pytest.raises(IdxError, match="magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(IdxError, match="type code"):
        parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(IdxError, match="needs"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")


# -------------------------------------------------------------------------- datasets


def test_digits() -> None:
    ds = load_dataset("digits", seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1:] == (1, 8, 8)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert 0.19 < len(ds.y_test) / 1797 < 0.21
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    # stratified: every class's share of the test set matches its share overall
    share = torch.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    overall = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10) / 1797
    assert torch.allclose(share, overall, atol=0.01)
    assert load_dataset("digits", seed=0) is ds  # shared, loaded once
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_test, ds.y_test)


def test_synthetic_is_fixed_and_has_sources() -> None:
    ds = load_dataset("synthetic")
    assert ds.sources is not None and len(ds.sources) == len(ds.y_train)
    assert ds.input_shape == (1, 8, 8)
    assert len(np.unique(ds.sources)) >= 4
    clear_dataset_cache()
    again = load_dataset("synthetic")
    assert again.sources is not None
    assert torch.equal(ds.x_train, again.x_train) and np.array_equal(ds.sources, again.sources)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader_on_tiny_files(tmp_path: Path, name: str) -> None:
    arrays = _tiny_idx_arrays()
    _write_tiny(tmp_path / name, arrays)
    ds = load_dataset(name, data_dir=tmp_path, verify=False)
    assert ds.name == name and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255
    assert torch.allclose(ds.x_train[:, 0], expected)
    assert np.array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    normalized = load_dataset(name, data_dir=tmp_path, verify=False, normalize=True)
    assert abs(float(normalized.x_train.mean())) < 1e-4
    assert abs(float(normalized.x_train.std()) - 1) < 1e-3


def test_uncompressed_idx_files_are_accepted(tmp_path: Path) -> None:
    for name, array in _tiny_idx_arrays().items():
        (tmp_path / "mnist").mkdir(exist_ok=True)
        write_idx(tmp_path / "mnist" / name, array)
    assert load_dataset("mnist", data_dir=tmp_path, verify=False).x_train.shape[0] == 20


def test_checksums_are_verified(tmp_path: Path) -> None:
    _write_tiny(tmp_path / "mnist", _tiny_idx_arrays())
    with pytest.raises(DatasetUnavailable, match="checksum.*p2pfl data fetch mnist"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_dataset_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match=r"run `p2pfl data fetch fashion_mnist`"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_corrupt_file_says_how_to_fetch(tmp_path: Path) -> None:
    _write_tiny(tmp_path / "mnist", _tiny_idx_arrays())
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DatasetUnavailable, match="p2pfl data fetch mnist"):
        load_dataset("mnist", data_dir=tmp_path, verify=False)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")


def test_default_data_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PFL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("P2PFL_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "p2pfl" / "data"


def _fetched(name: str) -> bool:
    folder = default_data_dir() / name
    return all(find_idx_file(folder, f) is not None for f in IDX_DATASETS[name])


@pytest.mark.skipif(not _fetched("mnist"), reason="MNIST not fetched into the default data dir")
def test_real_mnist() -> None:
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist()[:2] == [5923, 6742]


@pytest.mark.skipif(
    not _fetched("fashion_mnist"), reason="Fashion-MNIST not fetched into the default data dir"
)
def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10


# ---------------------------------------------------------------------------- fetch


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Make 'mnist' a dataset of tiny files whose md5s the tables know; return gz blobs."""
    arrays = _tiny_idx_arrays(seed=5)
    blobs, files = {}, []
    for name, array in arrays.items():
        raw = (
            bytes([0, 0, 8, array.ndim])
            + np.asarray(array.shape, ">u4").tobytes()
            + array.tobytes()
        )
        blobs[name] = gzip.compress(raw, mtime=0)
        files.append(IdxFile(name, payload_md5(raw)))
    monkeypatch.setitem(IDX_DATASETS, "mnist", tuple(files))
    return blobs


def _source(blobs: dict[str, bytes], calls: list[str], label: str = "fake") -> Source:
    def get(_tmp: Path, files):
        calls.append(label)
        return {f.name: blobs[f.name] for f in files}

    return Source(label, get)


def _failing_source(calls: list[str]) -> Source:
    def get(_tmp: Path, files):
        calls.append("down")
        raise OSError("registry unreachable")

    return Source("down", get)


def test_fetch_writes_verified_files_and_is_idempotent(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    calls: list[str] = []
    folder = fetch_dataset(
        "mnist", tmp_path, sources=[_failing_source(calls), _source(fake_mnist, calls)]
    )
    assert folder == tmp_path / "mnist"
    assert calls == ["down", "fake"]  # fell back to the next source
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    assert verify_dataset("mnist", tmp_path) == []
    assert load_dataset("mnist", data_dir=tmp_path).x_train.shape == (20, 1, 28, 28)

    fetch_dataset("mnist", tmp_path, sources=[_source(fake_mnist, calls)])
    assert calls == ["down", "fake"]  # nothing fetched the second time


def test_fetch_rejects_bad_checksums(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    tampered = dict(fake_mnist)
    tampered["t10k-labels-idx1-ubyte"] = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    calls: list[str] = []
    with pytest.raises(FetchError, match="checksum") as info:
        fetch_dataset("mnist", tmp_path, sources=[_failing_source(calls), _source(tampered, calls)])
    assert "registry unreachable" in str(info.value)
    assert not (tmp_path / "mnist").exists()  # nothing half-written


def test_fetch_replaces_only_bad_files(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    calls: list[str] = []
    fetch_dataset("mnist", tmp_path, sources=[_source(fake_mnist, calls)])
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"junk")
    assert verify_dataset("mnist", tmp_path) == ["train-labels-idx1-ubyte"]
    fetch_dataset("mnist", tmp_path, sources=[_source(fake_mnist, calls)])
    assert verify_dataset("mnist", tmp_path) == []


def test_fetch_needs_nothing_for_builtin_datasets(tmp_path: Path) -> None:
    assert fetch_dataset("digits", tmp_path, sources=[]) == tmp_path / "digits"
    assert not (tmp_path / "digits").exists()


def test_digits_split_is_read_back_without_scikit_learn(tmp_path, monkeypatch):
    """The first load saves the split; a later process reads it without importing
    scikit-learn (about 80 MB of a node's memory), and gets the very same arrays."""
    import subprocess
    import sys

    import numpy as np

    from p2pfl.learning import datasets

    monkeypatch.setenv("P2PFL_DATA_DIR", str(tmp_path))
    computed = datasets._digits_split(3)
    assert (tmp_path / "digits" / "split-3.npz").exists()
    again = datasets._digits_split(3)
    for a, b in zip(computed, again, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    probe = (
        "import sys; from p2pfl.learning import datasets as d; d._digits_split(3); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "P2PFL_DATA_DIR": str(tmp_path)},
    )
    assert out.stdout.strip() == "False", out.stderr
    # a damaged copy is recomputed, not trusted
    (tmp_path / "digits" / "split-3.npz").write_bytes(b"garbage")
    for a, b in zip(computed, datasets._digits_split(3), strict=True):
        assert np.array_equal(a, b)
