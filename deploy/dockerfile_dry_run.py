"""Run the Dockerfile's build steps without Docker, then start the result like the image's CMD would.

    .venv/bin/python -m deploy.dockerfile_dry_run [--build-arg K=V ...] [--keep]

The builder stage's instructions run in order in a fresh temporary root: ``ARG``/``ENV`` set the environment,
``WORKDIR``/``COPY`` lay out the build context (filtered by ``.dockerignore``), each ``RUN`` runs verbatim under
``sh -c``. The image's absolute paths (``/opt``, ``/src``, ``/data``, ``/home``, ``/usr/local/bin``) are rebased
under the temporary root, and ``python`` is this machine's base interpreter (the venv is created from it, as in the
image). The runtime stage's ``RUN`` (``useradd``, ``mkdir`` of the snapshot folder) is not executed here (the folder
is made); its ``COPY --from=builder`` paths are checked, its ``ENV`` is applied, and its ``CMD`` is started from a
folder outside the repo: ``/ready`` must answer, the ``HEALTHCHECK`` command must pass and one streamed generation
must finish.

PyTorch's CPU index is not reachable on the development machine, so ``TORCH_INDEX_URL`` defaults to PyPI here
(pip's configured find-links supply the CPU wheel); on a normal machine pass the image's own default. Slow
(minutes: a whole venv is installed): run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deploy.dockerfile import copy_sources, dockerignore_includes, exec_form, read_dockerignore, stages
from loadtest.stack import LOOPBACK, free_port, log_tail, process, wait_ok

REPO = Path(__file__).resolve().parent.parent
_IMAGE_PATH = re.compile(r"(?<![\w.:/-])(/opt|/src|/data|/home|/usr/local/bin)(?=/|\b)")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class DryRun:
    def __init__(self, root: Path, build_args: dict[str, str]):
        self.root = root
        self.build_args = build_args
        self.shim = root / "shim"
        self.shim.mkdir(parents=True)
        (self.shim / "python").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
        base = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        self.env = {**base, "HOME": str(root / "home"), "PATH": f"{self.shim}:/usr/local/bin:/usr/bin:/bin"}
        self.workdir = root

    def rebase(self, text: str) -> str:
        return _IMAGE_PATH.sub(lambda m: str(self.root) + m.group(1), text)

    def expand(self, text: str) -> str:
        return _VARIABLE.sub(lambda m: self.env.get(m.group(1) or m.group(2), ""), text)

    def arg(self, args: str) -> None:
        name, _, default = args.partition("=")
        self.env[name] = self.build_args.get(name, default)

    def set_env(self, args: str) -> None:
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            self.env[key] = self.rebase(self.expand(value))

    def set_workdir(self, args: str) -> None:
        self.workdir = Path(self.rebase(self.expand(args)))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def copy(self, args: str, context: Path) -> None:
        origin, sources, dest = copy_sources(args)
        dest_path = Path(self.rebase(dest))
        dest_path = dest_path if dest_path.is_absolute() else self.workdir / dest_path
        for source in sources:
            if origin is not None:
                # Same rebased path in both stages: the builder's output is already where the runtime wants it.
                assert Path(self.rebase(source)) == dest_path, (source, dest)
                assert dest_path.exists(), f"COPY --from={origin} {source}: missing after the build"
                continue
            src = context / source
            target = dest_path / src.name if dest.endswith("/") and src.is_dir() else dest_path
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)

    def run(self, command: str) -> None:
        print(f"RUN {command[:150]}{'...' if len(command) > 150 else ''}", flush=True)
        started = time.monotonic()
        subprocess.run(["sh", "-c", self.rebase(command)], cwd=self.workdir, env=self.env, check=True, timeout=1800)
        print(f"    ({time.monotonic() - started:.0f} s)", flush=True)


def build_context(dest: Path) -> Path:
    """The files `docker build .` would send: the repo filtered by .dockerignore."""
    patterns = read_dockerignore(REPO / ".dockerignore")
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        if (REPO / name).is_file() and dockerignore_includes(patterns, name):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def smoke_test(dry: DryRun, healthcheck: list[str], cmd: list[str]) -> None:
    """Start the runtime CMD in the image's WORKDIR (outside the repo), wait for /ready, run the HEALTHCHECK,
    stream one reply."""
    port = free_port()
    env = {**dry.env, "H2O_HOST": LOOPBACK, "H2O_PORT": str(port)}
    env["PATH"] = f"{dry.root}/usr/local/bin:{env['PATH']}"
    Path(env["H2O_SNAPSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
    python = shutil.which("python", path=env["PATH"])
    where = subprocess.run(
        [python, "-c", "import app; print(app.__file__)"],
        env=env,
        cwd=dry.workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(dry.root)), f"app imported from {where}, not from the image's venv"
    log_path = dry.root / "server.log"
    argv = [shutil.which(cmd[0], path=env["PATH"]), *cmd[1:]]
    with process(argv, log_path, env, cwd=dry.workdir) as proc:
        wait_ok(f"http://{LOOPBACK}:{port}/ready", proc, log_path, timeout_s=300)
        check = subprocess.run([shutil.which(healthcheck[0], path=env["PATH"]), *healthcheck[1:]], env=env, timeout=30)
        assert check.returncode == 0, "HEALTHCHECK failed against a ready server"
        body = json.dumps({"message": "Say hello.", "max_new_tokens": 8, "stream": True}).encode()
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/sessions/dry-run/generate",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            stream = response.read().decode()
        assert "event: done" in stream, f"no done event in:\n{stream}\n{log_tail(log_path)}"
    print(f"server ready, HEALTHCHECK passed, one reply streamed; app imported from {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root")
    args = parser.parse_args(argv)
    build_args = {"TORCH_INDEX_URL": "https://pypi.org/simple"}
    build_args.update(kv.split("=", 1) for kv in args.build_arg)
    root = Path(tempfile.mkdtemp(prefix="h2o-dry-run-"))
    started = time.monotonic()
    try:
        context = build_context(root / "context")
        global_args, (builder, *_, runtime) = stages((REPO / "Dockerfile").read_text())
        dry = DryRun(root / "image", build_args)
        (dry.root / "home").mkdir(parents=True)
        for name, default in global_args.items():
            dry.arg(f"{name}={default}")
        for stage in (builder, runtime):
            for inst in stage.instructions:
                if inst.keyword == "ARG":
                    dry.arg(inst.args)
                elif inst.keyword == "ENV":
                    dry.set_env(inst.args)
                elif inst.keyword == "WORKDIR":
                    dry.set_workdir(inst.args)
                elif inst.keyword == "COPY":
                    dry.copy(inst.args, context)
                elif inst.keyword == "RUN" and stage is builder:
                    dry.run(inst.args)
        smoke_test(dry, exec_form(runtime.all("HEALTHCHECK")[0]), exec_form(runtime.all("CMD")[0]))
        print(f"dry run passed in {time.monotonic() - started:.0f} s ({root})")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
