"""Test tiers. `make test-fast` runs what needs no real model, no other process and no system binary (markers
below); `make test` runs every tier. Whole folders whose every test starts server processes are marked here, so a
new test there cannot slip into the fast tier; elsewhere a module or a test carries its marker itself."""

from __future__ import annotations

from pathlib import Path

import pytest

PROCESS_FOLDERS = ("reliability", "scaleout")
"""Test folders whose tests run real `python -m app` processes (and nginx)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).parent.name in PROCESS_FOLDERS:
            item.add_marker(pytest.mark.process)
