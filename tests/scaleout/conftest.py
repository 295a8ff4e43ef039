"""A real nginx (Debian's package) rendered from deploy/nginx/h2o-router.conf.template, in front of real server
processes from tests/reliability (tiny random Llama saved to a tmp dir)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.reliability.conftest import (  # noqa: F401 (fixtures)
    REPO,
    launch,
    tiny_model,
    tiny_model_dir,
    tokenizer,
)

TEMPLATE = REPO / "deploy/nginx/h2o-router.conf.template"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
NGINX = shutil.which("nginx", path=f"/usr/sbin:{os.environ.get('PATH', '')}")


def render(template: str, values: dict[str, str]) -> str:
    """What envsubst does in the nginx image with NGINX_ENVSUBST_FILTER=^H2O_: replace ${H2O_*} only."""
    rendered = re.sub(r"\$\{(H2O_\w+)\}", lambda m: values[m.group(1)], template)
    assert "${" not in rendered, "a placeholder was left unrendered"
    return rendered


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Router:
    """nginx in the foreground (`daemon off`), every path under `root`, routing to `upstreams` (host:port)."""

    def __init__(self, root: Path, upstreams: list[str]) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for temp in TEMP_DIRS:
            (root / temp).mkdir(parents=True, exist_ok=True)
        self.set_upstreams(upstreams)
        (root / "h2o-router.conf").write_text(
            render(
                TEMPLATE.read_text(),
                {"H2O_ROUTER_LISTEN": f"127.0.0.1:{self.port}", "H2O_UPSTREAMS": str(root / "upstreams.conf")},
            )
        )
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the tmp dirs
        temps = "\n".join(f"    {t}_temp_path {root / t};" for t in TEMP_DIRS)
        (root / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} notice;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n    access_log {root / 'access.log'};\n{temps}\n    include {root / 'h2o-router.conf'};\n}}\n"
        )
        command = [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def set_upstreams(self, upstreams: list[str]) -> None:
        lines = [f"server {u} max_fails=1 fail_timeout=10s;\n" for u in upstreams]
        (self.root / "upstreams.conf").write_text("".join(lines))

    def reload(self, upstreams: list[str]) -> None:
        """New upstreams, applied by SIGHUP (new workers; the old ones finish their requests and leave)."""
        self.set_upstreams(upstreams)
        started = self.log().count("start worker process")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        master = psutil.Process(self.proc.pid)
        # The new worker has started and the old one has closed its idle connections and left (worker_processes 1).
        while self.log().count("start worker process") == started or len(master.children()) != 1:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    def stop(self) -> None:
        """Fast shutdown of master and workers; SIGKILL to each that is left (workers outlive a killed master)."""
        try:
            processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)

    def log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def start_router(tmp_path) -> Iterator:
    if NGINX is None:
        pytest.skip("nginx not installed (scripts/system-deps.sh installs Debian's package)")
    routers: list[Router] = []

    def start(upstreams: list[str]) -> Router:
        routers.append(Router(tmp_path / f"nginx-{len(routers)}", upstreams))
        return routers[-1]

    try:
        yield start
    finally:
        for router in routers:
            router.stop()
