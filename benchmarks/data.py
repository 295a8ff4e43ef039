"""Evaluation text: WikiText-2 test and the Project Gutenberg books standing in for PG-19, read from the shared data
folder (never fetched, never copied into the repo), Gutenberg header/footer stripped, tokenized to a fixed length.

Text groups (``--texts``): ``wikitext``; ``pg19`` = the three tuning books (one row each); ``heldout`` = A Tale of
Two Cities, which no tuning decision may look at. Single names (``moby``, ``pride``, ``sherlock``, ``tale``) work too.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = "../shared/data"

FILES = {
    "wikitext": "wikitext2_test.txt",
    "moby": "pg_moby_dick.txt",
    "pride": "pg_pride_and_prejudice.txt",
    "sherlock": "pg_sherlock_holmes.txt",
    "tale": "pg_tale_of_two_cities.txt",
}
GROUPS = {"wikitext": ("wikitext",), "pg19": ("moby", "pride", "sherlock"), "heldout": ("tale",)}
HELDOUT = frozenset(GROUPS["heldout"])


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` as given if absolute, else relative to the repository root (default ``../shared/data``)."""
    path = Path(data_dir or DEFAULT_DATA_DIR)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def text_checksums(data_dir: str | Path | None = None) -> dict[str, str]:
    """sha256 of every evaluation text present (row name -> hex digest), so a result says which texts it read."""
    folder = resolve_data_dir(data_dir)
    return {
        row: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for row, name in FILES.items()
        if (folder / name).is_file()
    }


def expand_texts(spec: str | list[str]) -> list[str]:
    """``"wikitext,pg19"`` -> ``["wikitext", "moby", "pride", "sherlock"]`` (row names, in order, no repeats)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    rows: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        if name not in GROUPS and name not in FILES:
            raise ValueError(f"unknown text {name!r}; choose from {sorted(set(GROUPS) | set(FILES))}")
        rows += [r for r in GROUPS.get(name, (name,)) if r not in rows]
    return rows


def group_of(row: str) -> str:
    return next((g for g, rows in GROUPS.items() if row in rows), row)


def strip_gutenberg(text: str) -> str:
    """The prose between the ``*** START OF`` and ``*** END OF`` marker lines (whole text if they are absent)."""
    lines = text.splitlines(keepends=True)
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
    return "".join(lines[start:end]).strip() + "\n"


def read_text(row: str, data_dir: str | Path | None = None) -> str:
    path = resolve_data_dir(data_dir) / FILES[row]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir (see /work/shared/data/SOURCES.md)")
    text = path.read_text(encoding="utf-8")
    return text if row == "wikitext" else strip_gutenberg(text)


def synthetic_text(row: str, n_words: int = 20000) -> str:
    """Seeded pseudo-prose for smoke runs on machines without the data folder."""
    rng = random.Random(row)
    vocab = [rng.choice("etaoinshrdlu") * rng.randint(1, 3) + rng.choice("aeiou") for _ in range(300)]
    return " ".join(rng.choice(vocab) for _ in range(n_words)) + "\n"


def tokenize(tokenizer, row: str, n_tokens: int, data_dir: str | Path | None = None, synthetic: bool = False):
    """The first ``n_tokens`` token ids of a text, as a list of ints (no special tokens added)."""
    text = synthetic_text(row) if synthetic else read_text(row, data_dir)
    n_chars = 8 * n_tokens  # ~4 chars per token in English; tokenize a prefix, not a whole 1 MB book
    while True:
        ids = tokenizer.encode(text[:n_chars], add_special_tokens=False)
        if len(ids) > n_tokens + 16 or n_chars >= len(text):  # margin: the cut may split a word
            break
        n_chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"{row} has only {len(ids)} tokens; asked for {n_tokens}")
    return ids[:n_tokens]
