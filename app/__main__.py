"""`python -m app` / `h2o-serve`: run the server with uvicorn on H2O_HOST:H2O_PORT, with a graceful SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.settings import Settings


class GracefulServer(uvicorn.Server):
    """uvicorn, except on SIGTERM/SIGINT: stop accepting, let running turns finish for H2O_SHUTDOWN_GRACE_S, then
    cancel them (the partial turn is kept), save every session, and exit 0 (plain uvicorn re-raises the signal,
    so the process would end by it). A second signal forces the exit."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        logging.getLogger(__name__).info("%s: draining", signal.Signals(sig).name)
        self.should_exit = True
        self.config.app.state.server.begin_drain()


def main() -> None:
    unknown = Settings.unknown_variables(os.environ)
    if unknown:
        sys.exit(f"unknown setting(s) {', '.join(unknown)}: no H2O_* variable of that name exists (see README, "
                 "Configuration); refusing to start")
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings, refusing to start:\n{exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.main import app  # after logging is set up; builds the app from the same environment

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s + 5)
    GracefulServer(config).run()


if __name__ == "__main__":
    main()
