"""`python -m benchmarks all` and its catalog: every committed result has an entry whose arguments still parse and
still give the arguments the committed run recorded, the committed index is up to date, and a smoke run writes its
results and an index naming the commit it ran at."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import catalog, report
from benchmarks.data import REPO_ROOT

SMOKE_ENTRIES = ("ppl", "stress32k")
"""Two of the cheapest smoke runs (about 8 s each on 2 cores; the whole catalog's take 7 min), one in a subfolder."""


def test_catalog_covers_every_committed_result():
    assert {entry.path for entry in catalog.CATALOG} == set(catalog.result_stems(report.RESULTS_DIR))
    assert len(catalog.BY_NAME) == len(catalog.BY_PATH) == len(catalog.CATALOG)


@pytest.mark.parametrize("entry", catalog.CATALOG, ids=lambda entry: entry.name)
def test_catalog_arguments_give_the_recorded_run(entry):
    """The script's parser takes the entry's arguments; where the committed JSON recorded its arguments, they are
    those (None: a value the script fills in after parsing; --out is the runner's)."""
    parsed = vars(catalog.parse(entry))
    recorded = json.loads((report.RESULTS_DIR / f"{entry.path}.json").read_text()).get("args", {})
    assert set(recorded) <= set(parsed), "an option the committed run used is gone"
    differ = {k: (v, parsed[k]) for k, v in recorded.items() if k != "out" and parsed[k] is not None and parsed[k] != v}
    assert not differ, f"recorded vs catalog: {differ}"


def test_committed_index_is_current():
    """Regenerate with `python -m benchmarks index` after changing the results or the catalog."""
    assert (report.RESULTS_DIR / "INDEX.md").read_text() == catalog.render_index(report.RESULTS_DIR)


@pytest.mark.process
def test_all_smoke_writes_results_and_index(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "all", "--smoke", "--only", ",".join(SMOKE_ENTRIES)]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO_ROOT, check=True, timeout=300)
    for name in SMOKE_ENTRIES:
        for suffix in (".json", ".md"):
            assert (tmp_path / f"{catalog.BY_NAME[name].path}{suffix}").stat().st_size > 0
    head = report.run_start()["git_commit"][:7]
    index = (tmp_path / "INDEX.md").read_text()
    rows = {cells[0]: cells for cells in (line.split(" | ") for line in index.splitlines() if line.startswith("| "))}
    assert {name: rows[f"| {name}"][3] for name in SMOKE_ENTRIES} == {name: f"`{head}`" for name in SMOKE_ENTRIES}
    assert f"All 2 result files ran at one commit: `{head}` (2)." in index
