"""One worker process per config, driven in round-robin by the parent.

Each worker holds its own model and :class:`~benchmarks.runner.Session`, so its peak RSS is that config's peak RSS,
and only one worker computes at a time, so timings are interleaved and see the same machine noise.
``inline=True`` keeps every session in the calling process (smoke runs: no process start-up cost).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

from benchmarks.runner import Session, Spec


def _serve(conn, spec: Spec) -> None:
    try:
        session = Session(spec)
        conn.send(("ok", None))
    except Exception:  # report the failure to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        method, kwargs = message
        try:
            conn.send(("ok", getattr(session, method)(**kwargs)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Pool:
    """``pool.call(i, "method", **kwargs)`` runs ``Session.method`` in worker ``i`` and returns its result."""

    def __init__(self, specs: list[Spec], inline: bool = False):
        self.specs = specs
        self.inline = inline
        if inline:
            self.sessions = [Session(spec) for spec in specs]
            return
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, spec), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for i in range(len(specs)):
            self._receive(i)

    def _receive(self, i: int):
        status, value = self.conns[i].recv()
        if status == "error":
            self.close()
            raise RuntimeError(f"worker for {self.specs[i].label} failed:\n{value}")
        return value

    def call(self, i: int, method: str, **kwargs):
        if self.inline:
            return getattr(self.sessions[i], method)(**kwargs)
        self.conns[i].send((method, kwargs))
        return self._receive(i)

    def close(self) -> None:
        if self.inline:
            self.sessions = []
            return
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
