"""Real server processes (`python -m app`) on a tiny random-weight Llama saved to disk, for restarts and signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.app.conftest import SMALL_POLICY, SMALL_SLACK, tiny_model, tokenizer  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
START_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:  # noqa: F811 (the fixture imported above)
    """The tests/app tiny model and SmolLM2 tokenizer, saved so a server process can load it as H2O_MODEL."""
    model, tok = tiny_model
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class ServerProcess:
    """`python -m app` on 127.0.0.1:<free port>; its log goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**env, "H2O_PORT": str(self.port)},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def client(self, key: str | None = KEY_A, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers, **kwargs)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """SIGKILL if still running (cleanup path; tests send their own signals)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]


class Launcher:
    """Starts server processes with env overrides; `close` kills every one still running."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self._model_dir, self._log_dir = model_dir, log_dir
        self.started: list[ServerProcess] = []

    def __call__(self, snapshot_dir: Path, **env) -> ServerProcess:
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "H2O_MODEL": str(self._model_dir),
            "H2O_DEVICE": "cpu",
            "H2O_POLICY": SMALL_POLICY,
            "H2O_POLICY_SLACK": str(SMALL_SLACK),
            "H2O_SNAPSHOT_DIR": str(snapshot_dir),
            "H2O_API_KEYS": f"{KEY_A},{KEY_B}",
            "H2O_LOG_LEVEL": "warning",
            "H2O_REPLICA_NAME": "reliability",
            **{f"H2O_{k.upper()}": str(v) for k, v in env.items()},
        }
        server = ServerProcess(full_env, self._log_dir / f"server-{len(self.started)}.log")
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def launch(tiny_model_dir, tmp_path) -> Iterator[Launcher]:
    launcher = Launcher(tiny_model_dir, tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def launch_for_module(tiny_model_dir, tmp_path_factory) -> Iterator[Launcher]:
    launcher = Launcher(tiny_model_dir, tmp_path_factory.mktemp("servers"))
    try:
        yield launcher
    finally:
        launcher.close()
