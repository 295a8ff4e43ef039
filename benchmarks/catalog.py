"""Every committed result in benchmarks/results/ and the command that reproduces it: what `python -m benchmarks all`
runs, and how INDEX.md names each result file's entry."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from benchmarks import report
from benchmarks.runner import SMOKE_MODEL


@dataclass(frozen=True)
class Entry:
    name: str
    script: str
    """Module run as `python -m <script>`."""
    args: str
    """Every argument but --out (and --smoke), as the committed run was made."""
    path: str
    """The result file inside the results folder, without its suffix (the .md, .png, ... sit beside it)."""
    minutes: int
    """Wall time of the committed run on the project's shared 2-core CPU: a rough cost."""
    smoke: bool = True
    """Whether the script has a --smoke mode (tiny random model, seconds)."""
    out_file: bool = False
    """--out names the JSON file itself (scripts/soak.py), not a folder."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment the committed run had that its arguments do not say."""
    caveats: tuple[tuple[str, str], ...] = ()
    """(recorded commit, what its metadata does not say): shown in the index while the result is that run's."""

    def command(self, results: Path, smoke: bool = False) -> list[str]:
        """The command line that writes this entry's files under `results` (laid out as benchmarks/results is)."""
        out = results / f"{self.path}.json" if self.out_file else (results / self.path).parent
        return [sys.executable, "-m", self.script, *self.argv, *(["--smoke"] if smoke else []), "--out", str(out)]

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.args)


_AT_END = "commit recorded when the run ended (before d5409f3 recorded it at the start)"
_WRITE_COPY = "the uncommitted change was H2OLayer._write's copy, committed next as cf71206 (README)"

CATALOG: tuple[Entry, ...] = (
    Entry(
        "ablations",
        "benchmarks.ablate",
        "--step 16 --tokens 1536",
        "ablations",
        58,
        caveats=(("0a6e83b", f"{_AT_END}; it started on 0e94d80 (phase 1), phases 2-3 on 9c4562c (README)"),),
    ),
    Entry(
        "ppl",
        "benchmarks.ppl",
        "--step 16 --texts wikitext,pg19,heldout --reps 2 --new 32 "
        "--extra h2o_4_128_256,h2o_4_224_256,h2o_4_128_512,h2o_4_256_512,h2o_4_448_512",
        "ppl",
        14,
    ),
    Entry(
        "stress",
        "benchmarks.stress",
        "--configs baseline,h2o_4_128_512,h2o_4_128_512:rolling=false --tokens 24576 --baseline-tokens 10240 "
        "--step 128",
        "stress",
        51,
        caveats=(("4d6116d", f"{_AT_END}; it started on 0e94d80 (README)"),),
    ),
    Entry(
        "stress32k",
        "benchmarks.stress",
        "--configs h2o_4_256_512,streaming_4_512 --tokens 32768 --step 128",
        "stress32k/stress",
        10,
    ),
    Entry(
        "speed",
        "benchmarks.speed",
        "--configs baseline,h2o_8_32_256,h2o_4_256_512 --contexts 1024,2048,4096,8192 --new 64 --reps 2",
        "speed",
        11,
    ),
    Entry(
        "oracle",
        "benchmarks.oracle",
        "",
        "oracle",
        10,
        caveats=(("c648de4", "JSON edited after the run (433a95b: configs without scores have ranking null)"),),
    ),
    Entry("eviction", "benchmarks.eviction", "", "eviction", 1),
    Entry("batching", "benchmarks.batching", "--threads 2", "batching", 6),
    Entry(
        "soak_smollm2",
        "scripts.soak",
        "--tokens 50000",
        "soak_smollm2",
        95,
        smoke=False,
        out_file=True,
        env=(("OMP_NUM_THREADS", "1"),),
    ),
    Entry("bytes", "benchmarks.bytes", "--threads 2", "bytes", 26, caveats=(("66c2709", _WRITE_COPY),)),
    Entry(
        "candidates",
        "benchmarks.ppl",
        "--configs full,h2o_4_256_512,h2o_4_256_512_k8v4,h2o_4_264_528_k8v4,h2o_4_368_736_int4,h2o_4_216_432_int8,"
        "h2o_4_256_512:score_mode=tova,h2o_4_256_512:score_mode=keydiff --texts wikitext,pg19,heldout --tokens 2048 "
        "--step 16 --reps 1 --new 4 --prompt 64 --name candidates",
        "candidates",
        9,
        caveats=(("1b1b57e", _WRITE_COPY),),
    ),
    Entry(
        "defaults",
        "benchmarks.ppl",
        "--configs full,h2o_4_256_512,h2o_4_280_560_k8v4,h2o_4_70_560_k8v4,h2o_4_290_580_k8v4:score_mode=keydiff,"
        "streaming_4_560_k8v4 --texts wikitext,pg19,heldout --tokens 2048 --step 16 --reps 1 --new 4 --prompt 64 "
        "--threads 2 --name defaults",
        "defaults",
        3,
    ),
    Entry(
        "session_bytes",
        "benchmarks.session_bytes",
        "--sessions 8 --kv-dtypes auto,k8v4",  # pinned: the script's default follows H2O_KV_DTYPE
        "session_bytes",
        2,
    ),
    Entry(
        "speed_kv",
        "benchmarks.speed",
        "--configs full,full_int8,full_k8v4,h2o_4_256_512,h2o_4_256_512_int8,h2o_4_280_560_k8v4 --contexts 1024,8192 "
        "--new 32 --reps 2 --threads 2",
        "speed_kv/speed",
        6,
    ),
    Entry(
        "recall",
        "benchmarks.recall",
        "--configs full,streaming_4_976_int8,h2o_4_488_976_int8,h2o_4_592_1184_k8v4",
        "recall",
        22,
    ),
    Entry(
        "recall_default",
        "benchmarks.recall",
        "--configs h2o_4_280_560_k8v4,streaming_4_560_k8v4 --threads 2",
        "recall_default/recall",
        2,
    ),
    Entry(
        "stress32k_k8v4",
        "benchmarks.stress",
        "--configs h2o_4_280_560_k8v4,streaming_4_560_k8v4 --tokens 32768 --step 128 --threads 2",
        "stress32k_k8v4/stress",
        4,
    ),
    Entry("weights", "benchmarks.weights", "", "weights/weights", 6),
    Entry("profile_step", "benchmarks.profile_step", "", "profile/profile_step", 2),
    Entry("compile_probe", "benchmarks.compile_probe", "", "compile/compile_probe", 5),
    Entry(
        "vs_llamacpp",
        "benchmarks.vs_llamacpp",
        "--build --dtype int4,fp32 --policies default,h2o_4_280_560_bf16,full --chat-policies default --llama-fa off "
        "--contexts 256,1024,4096,8192 --new 32 --reps 2 --turns 3",
        "vs_llamacpp/vs_llamacpp",
        25,
    ),
)
BY_NAME = {entry.name: entry for entry in CATALOG}
BY_PATH = {entry.path: entry for entry in CATALOG}


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse(entry: Entry) -> argparse.Namespace:
    """The entry's arguments as its script's own parser reads them, without running the script (the scripts build
    their parsers inside main), so that a catalog entry cannot rot unnoticed. A bad argument raises SystemExit."""
    main = importlib.import_module(entry.script).main
    original = argparse.ArgumentParser.parse_args

    def stop(parser: argparse.ArgumentParser, args=None, namespace=None):
        raise _Parsed(original(parser, args, namespace))

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", stop),
        mock.patch.object(sys, "argv", [entry.script, *entry.argv]),
    ):
        try:
            main()
        except _Parsed as parsed:
            return parsed.namespace
    raise RuntimeError(f"{entry.script}.main() returned without parsing its arguments")


def write_index(folder: Path) -> Path:
    """Write `folder`/INDEX.md (see `render_index`)."""
    path = folder / "INDEX.md"
    path.write_text(render_index(folder))
    return path


def render_index(folder: Path) -> str:
    """One row per result file with the commit, date, machine and command its metadata records, and a warning when
    the files come from different commits: each result should be reproducible at one commit, and the index must say
    which one it was. Nothing in it depends on when it is written, so a stale committed index shows in a test."""
    stems = result_stems(folder)
    rows, commits, unrecorded = [], Counter(), 0
    for stem in stems:
        entry = BY_PATH.get(stem)
        meta = json.loads((folder / f"{stem}.json").read_text()).get("meta", {})
        commit = meta.get("git_commit", "")[:7]
        if commit:
            commits[commit] += 1
        else:
            unrecorded += 1
        rows.append(
            [
                entry.name if entry else "-",
                f"[{stem}.json]({stem}.json)",
                entry.script if entry else _script(meta.get("command", "")),
                f"`{commit}`" if commit else "not recorded",
                meta.get("date", "-")[:16],
                _machine(meta),
                f"`{meta['command']}`" if "command" in meta else "-",
                ", ".join(_flags(meta, entry)) or "-",
            ]
        )
    lines = [
        "# Results index",
        "",
        "Written by `python -m benchmarks index` (or at the end of `python -m benchmarks all`) from the metadata each "
        "result records; do not edit by hand. `python -m benchmarks all --list` has the command that reproduces each "
        "entry.",
        "",
        _commit_summary(len(stems), commits, unrecorded),
        "",
        report.markdown_table(["Entry", "Result", "Script", "Commit", "Date", "Machine", "Command", "Flags"], rows),
    ]
    missing = [entry.name for entry in CATALOG if not (folder / f"{entry.path}.json").is_file()]
    if missing:
        lines.append(f"Catalog entries with no result here: {', '.join(missing)}.\n")
    return "\n".join(lines)


def result_stems(folder: Path) -> list[str]:
    """The result files in `folder` as catalog paths (`recall_default/recall`): catalog order, then unknown ones."""
    stems = [path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.json")]
    return sorted(stems, key=lambda stem: (CATALOG.index(BY_PATH[stem]) if stem in BY_PATH else len(CATALOG), stem))


def _commit_summary(files: int, commits: Counter, unrecorded: int) -> str:
    counts = ", ".join(f"`{commit}` ({n})" for commit, n in commits.most_common())
    without = f"; {unrecorded} record no commit" if unrecorded else ""
    if len(commits) > 1:
        return (
            f"**Not one commit**: these {files} result files ran at {len(commits)} different commits ({counts})"
            f"{without}. Each row's commit is the library version that run loaded (but see its flags); "
            "`python -m benchmarks all --out <this folder>` reruns every entry at one commit."
        )
    return f"All {files} result files ran at one commit: {counts or 'none recorded'}{without}."


def _script(command: str) -> str:
    """The module of a recorded `python -m <module> ...` command."""
    words = command.split()
    return words[words.index("-m") + 1] if "-m" in words[:-1] else "-"


def _machine(meta: dict) -> str:
    if not meta:
        return "-"
    parts = [meta.get("device", "?"), f"{meta.get('cpu_count', '?')} CPUs", meta.get("machine", "").split(" ")[0]]
    return ", ".join(p for p in parts if p)


def _flags(meta: dict, entry: Entry | None) -> list[str]:
    """What a reader must know before trusting a row as the catalog's result."""
    flags = [] if entry else ["not in the catalog"]
    if not meta:
        return ["no metadata (commit, command, machine unknown)", *flags]
    if meta.get("model") == SMOKE_MODEL:
        flags.append("smoke run (tiny random model)")
    elif not meta.get("text_sha256"):
        flags.append("no text checksums")
    if meta.get("git_dirty_library"):
        flags.append("uncommitted h2o_cache changes")
    caveat = dict(entry.caveats).get(meta.get("git_commit", "")[:7]) if entry else None
    return flags + ([caveat] if caveat else [])
