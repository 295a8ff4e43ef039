"""`python -m app` / `h2o-serve`: run the server with uvicorn on H2O_HOST:H2O_PORT, with a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.settings import Settings


class GracefulServer(uvicorn.Server):
    """uvicorn, except on SIGTERM/SIGINT: stop accepting connections and run `drain` (app.main.drain: new turns get
    503 on the connections still open, running turns may finish for H2O_SHUTDOWN_GRACE_S, then are cancelled, the
    partial turn kept); only then let uvicorn shut down (close the connections, save every session), and exit 0.
    Plain uvicorn closes idle keep-alive connections at once (a client reusing one got a dropped connection, not
    the 503) and re-raises the signal (the process would end by it). A second signal forces the exit."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._start_drain = drain
        self._drain_requested = False
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self.should_exit:
            self.force_exit = self.should_exit = True
            return
        logging.getLogger(__name__).info("%s: draining", signal.Signals(sig).name)
        self._drain_requested = True  # the main loop starts the drain within 0.1 s (on_tick)

    async def on_tick(self, counter: int) -> bool:
        """Called by uvicorn's main loop every 0.1 s; the loop ends, and uvicorn's shutdown begins, on True."""
        if self._drain_requested and self._drain is None:
            for server in getattr(self, "servers", []):
                server.close()  # stop accepting; the connections already open stay open during the drain
            self._drain = asyncio.create_task(self._start_drain())
        if self._drain is not None and self._drain.done() and not self.should_exit:
            if not self._drain.cancelled() and self._drain.exception() is not None:
                logging.getLogger(__name__).error("drain failed", exc_info=self._drain.exception())
            self.should_exit = True
        return await super().on_tick(counter)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the request log's fields (a record's
    `h2o_fields`, as keys of their own; its message is then the short `h2o_summary`), and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "h2o_fields", None)
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, "h2o_summary", None) if fields else record.getMessage(),
        }
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(settings: Settings) -> None:
    """Every logger (uvicorn's too) through one stderr handler: readable lines, or JSON objects with
    H2O_LOG_FORMAT=json. uvicorn's access log is off: app.requests writes one line per request
    (app.request_log.RequestLog)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings (transformers' ...) in the same format, not raw stderr
    if settings.log_format == "json":  # transformers' own handler and progress bars would write plain text
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def main() -> None:
    unknown = Settings.unknown_variables(os.environ)
    if unknown:
        sys.exit(
            f"unknown setting(s) {', '.join(unknown)}: no H2O_* variable of that name exists (see README, "
            "Configuration); refusing to start"
        )
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings, refusing to start:\n{exc}")
    configure_logging(settings)
    from app.main import DRAIN_MARGIN_S, create_app, drain  # after logging is set up

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,  # logging is configured above
        timeout_graceful_shutdown=settings.shutdown_grace_s + DRAIN_MARGIN_S,
    )
    GracefulServer(config, lambda: drain(app)).run()


if __name__ == "__main__":
    main()
