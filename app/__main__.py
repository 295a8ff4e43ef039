"""`python -m app` / `h2o-serve`: run the server with uvicorn on H2O_HOST:H2O_PORT."""

from __future__ import annotations

import logging

import uvicorn

from app.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
