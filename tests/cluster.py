"""A harness for integration tests that run real node processes on 127.0.0.1.

Each peer is a separate ``python -m p2pfl.cli node`` process with its own identity key,
state directory and port; peer 0 is the bootstrap peer. The harness waits on the peers'
``status.json`` files (polling with a deadline: the processes share nothing else with the
test), can SIGKILL and restart a peer, and always kills everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.identity import Identity


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Cluster:
    def __init__(self, root: Path, config: Path, size: int, *, extra_args: list[str] | None = None) -> None:
        self.root = root
        self.config = config
        self.size = size
        self.extra_args = extra_args or []
        self.ports = free_ports(size)
        self.keys = [root / f"key{i}" for i in range(size)]
        self.peer_ids = [Identity.load_or_create(key).peer_id for key in self.keys]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Any] = {}

    def bootstrap_addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[0]}/p2p/{self.peer_ids[0]}"

    def state_dir(self, i: int) -> Path:
        return self.root / f"peer{i}"

    def start(self, i: int) -> None:
        args = [
            self.interpreter(i), "-m", "p2pfl.cli", "node",
            "--config", str(self.config),
            "--peer-index", str(i),
            "--num-peers", str(self.size),
            "--key-file", str(self.keys[i]),
            "--state-dir", str(self.state_dir(i)),
            "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[i]}",
            *self.extra_args,
        ]
        if i > 0:
            args += ["--bootstrap", self.bootstrap_addr()]
        log = (self.root / f"peer{i}.log").open("ab")
        self.logs[i] = log
        options = self.popen_options(i)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **options.pop("env", {}),
        }
        self.processes[i] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, **options
        )

    def interpreter(self, i: int) -> str:
        """The Python that runs peer ``i`` (a subclass's: another build or virtual environment)."""
        return sys.executable

    def popen_options(self, i: int) -> dict[str, Any]:
        """More ``subprocess.Popen`` keywords for peer ``i`` (a subclass's: a working
        directory, a cgroup to join before exec); ``env`` adds to the peers' environment."""
        return {}

    def start_all(self) -> None:
        for i in range(self.size):
            self.start(i)

    def status(self, i: int) -> dict[str, Any] | None:
        path = self.state_dir(i) / "status.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def require_status(self, i: int) -> dict[str, Any]:
        """Peer ``i``'s status, which the caller knows was written (an assertion if not)."""
        status = self.status(i)
        assert status is not None, f"peer {i} has no readable status.json"
        return status

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for i, process in self.processes.items():
                if process.poll() not in (None, 0):
                    raise AssertionError(f"peer {i} exited with {process.returncode}:\n{self.log_tail(i)}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_tail(0)}")

    def rounds_done(self, i: int) -> int:
        status = self.status(i)
        return int(status["rounds_done"]) if status else 0

    def kill(self, i: int) -> None:
        process = self.processes.pop(i)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def wait_exit(self, timeout: float) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for i, process in self.processes.items():
            try:
                codes[i] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as error:
                raise AssertionError(f"peer {i} still running after {timeout}s:\n{self.log_tail(i)}") from error
        return codes

    def log_tail(self, i: int, lines: int = 30) -> str:
        path = self.root / f"peer{i}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self.logs.values():
            log.close()
