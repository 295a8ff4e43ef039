"""Recall of facts planted early in a long chat, asked for after 1k / 4k / 16k tokens of other turns.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.recall                     # full, StreamingLLM, H2O; 1k/4k/16k
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.recall --distances 1024 --configs full,streaming_4_512,h2o_4_64_512
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.recall --smoke --out /tmp/bench  # tiny model, seconds

What a chat user feels when the cache is bounded. The conversation goes through the model's chat template: the user
states one fact per turn (a name, a number, a code such as ``K7-QX9``, ...; values drawn with ``--seed``) and the
assistant acknowledges; then come turns of other conversation: the user quotes a passage of one of the PG-19 tuning
books and asks to continue it, the assistant answers with the book's next passage (the three books in turn). After
``distance`` tokens of those turns the user asks for each fact, each question on its own copy of the cache (the
questions do not see each other). The assistant's answer starts with a lead-in (``Your name is``) so that both scores
are about the value: the log-probability of the value's tokens (teacher-forced) and greedy exact match (the value
appears in up to ``--new`` greedy tokens). The distances share one conversation: each config feeds it once and is
asked at each distance on the way.

Configs are policy names with options after colons, passed to ``CachePolicy.parse`` as they are
(``h2o_4_64_1024:score_mode=sum``, ``h2o_4_64_1024_int8``). One worker per config; the conversation goes to the
workers round-robin, about ``FEED_TOKENS`` at a time, and each call feeds its tokens at once (the policy's
``chunk_size`` splits them).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from benchmarks import report
from benchmarks.data import read_text, synthetic_text
from benchmarks.ppl import make_specs, parse_config
from benchmarks.runner import Spec, data_available
from benchmarks.workers import Pool

DEFAULT_CONFIGS = "full,streaming_4_1024,h2o_4_64_1024"
SMOKE_CONFIGS = "full,streaming_4_64,h2o_4_16_64"
DEFAULT_DISTANCES = "1024,4096,16384"
SMOKE_DISTANCES = "128,256"
FEED_TOKENS = 1024
"""Conversation tokens per worker call: the round-robin's grain (whole turns, so a call may hold more)."""
BOOKS = {"moby": "Moby Dick", "pride": "Pride and Prejudice", "sherlock": "The Adventures of Sherlock Holmes"}
ACK = "Got it, I will remember that."
COLUMNS = [
    "Config",
    "Distance (tokens)",
    "Mean answer log-prob",
    "Exact match",
    "KV held (MB)",
    "Feed (s)",
    "Questions (s)",
]

FIRST_NAMES = ("Marisol", "Theodore", "Anika", "Desmond", "Ingrid", "Rafael", "Yuki", "Oswin", "Priya", "Lorcan")
LAST_NAMES = ("Okafor", "Lindqvist", "Castellano", "Whitfield", "Nakamura", "Brennan", "Haddad", "Volkov", "Moreau")
CITIES = ("Valparaiso", "Tampere", "Ljubljana", "Windhoek", "Hobart", "Cusco", "Gdansk", "Mombasa", "Aarhus", "Da Nang")
PETS = ("Biscuit", "Pickles", "Marmalade", "Ziggy", "Noodle", "Clementine", "Waffles", "Pepper", "Juniper", "Mochi")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: they read as 1 and 0


@dataclass(frozen=True)
class Fact:
    """One kind of planted fact: the user's statement (``{}`` = the value), the question, the lead-in the
    assistant's answer starts with, and how a value is drawn."""

    key: str
    statement: str
    question: str
    lead: str
    draw: Callable[[random.Random], str]


def _code(rng: random.Random) -> str:
    return f"{rng.choice(LETTERS)}{rng.randint(1, 9)}-{rng.choice(LETTERS)}{rng.choice(LETTERS)}{rng.randint(1, 9)}"


FACTS = (
    Fact(
        "name",
        "My name is {}.",
        "What is my name?",
        "Your name is",
        lambda rng: f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
    ),
    Fact(
        "number",
        "My lucky number is {}.",
        "What is my lucky number?",
        "Your lucky number is",
        lambda rng: str(rng.randint(1000, 9999)),
    ),
    Fact(
        "code", "The code for my locker is {}.", "What is the code for my locker?", "The code for your locker is", _code
    ),
    Fact("city", "I grew up in {}.", "Where did I grow up?", "You grew up in", lambda rng: rng.choice(CITIES)),
    Fact("pet", "My cat is called {}.", "What is my cat called?", "Your cat is called", lambda rng: rng.choice(PETS)),
    Fact(
        "date",
        "My dentist appointment is on {}.",
        "When is my dentist appointment?",
        "Your dentist appointment is on",
        lambda rng: f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
    ),
)


@dataclass
class Chat:
    """The conversation as token pieces (``pieces[0]`` plants the facts, ``pieces[t + 1]`` is filler turn ``t``)
    and, per distance, the pieces that come before its questions and each fact's (question, answer) token ids."""

    pieces: list[list[int]]
    pieces_at: dict[int, int]
    questions: dict[int, list[tuple[list[int], list[int]]]]

    def filler_tokens(self, distance: int) -> int:
        return sum(len(p) for p in self.pieces[1 : self.pieces_at[distance]])

    def context_tokens(self, distance: int) -> int:
        return sum(len(p) for p in self.pieces[: self.pieces_at[distance]])


def draw_values(facts: tuple[Fact, ...], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [fact.draw(rng) for fact in facts]


def plant_messages(facts: tuple[Fact, ...], values: list[str]) -> list[dict]:
    """One user turn per fact, each acknowledged."""
    messages = []
    for fact, value in zip(facts, values):
        messages += [
            {"role": "user", "content": f"{fact.statement.format(value)} Please remember that."},
            {"role": "assistant", "content": ACK},
        ]
    return messages


def filler_turns(passage_words: int, data_dir: str | None, synthetic: bool) -> Iterator[list[dict]]:
    """Endless (user, assistant) turns: the user quotes a book's passage and asks to continue it, the assistant
    gives the next passage; the books take turns, each read on from its start."""
    words = {row: (synthetic_text(row) if synthetic else read_text(row, data_dir)).split() for row in BOOKS}
    offset = dict.fromkeys(BOOKS, 0)
    while True:
        for row, title in BOOKS.items():
            a = offset[row]
            quoted = " ".join(words[row][a : a + passage_words])
            continued = " ".join(words[row][a + passage_words : a + 2 * passage_words])
            if not continued:
                raise ValueError(f"{row} ran out of text; ask for shorter distances")
            offset[row] = a + 2 * passage_words
            yield [
                {"role": "user", "content": f"Here is a passage from {title}:\n\n{quoted}\n\nPlease continue it."},
                {"role": "assistant", "content": continued},
            ]


def build_chat(
    pool: Pool,
    facts: tuple[Fact, ...],
    values: list[str],
    distances: list[int],
    passage_words: int,
    data_dir: str | None,
    synthetic: bool,
) -> Chat:
    """Render the conversation with worker 0's chat template, turn by turn, until the longest distance is reached.
    A piece is the text a turn adds to the rendering of the conversation before it, so the pieces together are
    exactly the rendered conversation."""
    messages = plant_messages(facts, values)
    rendered = pool.call(0, "chat_text", messages=messages)
    pieces = pool.call(0, "encode", texts=[rendered])
    filler, pieces_at, questions = 0, {}, {}
    turns = filler_turns(passage_words, data_dir, synthetic)
    for distance in distances:
        while filler < distance:
            messages += next(turns)
            text = pool.call(0, "chat_text", messages=messages)
            if not text.startswith(rendered):
                raise ValueError("the chat template does not render a conversation as the start of its continuation")
            pieces += pool.call(0, "encode", texts=[text[len(rendered) :]])
            filler += len(pieces[-1])
            rendered = text
        pieces_at[distance] = len(pieces)
        texts = []
        for fact, value in zip(facts, values):
            asked = pool.call(
                0, "chat_text", messages=messages + [{"role": "user", "content": fact.question}], generation_prompt=True
            )
            texts += [asked[len(rendered) :] + fact.lead, f" {value}"]
        ids = pool.call(0, "encode", texts=texts)
        questions[distance] = list(zip(ids[::2], ids[1::2]))
    return Chat(pieces, pieces_at, questions)


def feed_groups(pieces: list[list[int]]) -> list[list[int]]:
    """Consecutive pieces joined into calls of about ``FEED_TOKENS`` tokens (a piece is never split)."""
    groups: list[list[int]] = []
    for piece in pieces:
        if groups and len(groups[-1]) + len(piece) <= FEED_TOKENS:
            groups[-1] = groups[-1] + piece
        else:
            groups.append(list(piece))
    return groups


def ask(
    pool: Pool, chat: Chat, distances: list[int], facts: tuple[Fact, ...], values: list[str], max_new: int
) -> list[dict]:
    """Feed the conversation to every config round-robin and ask the questions at each distance.
    Returns one result per (config, distance), config-major."""
    n = len(pool.specs)
    trained = [pool.call(i, "start_chat") for i in range(n)]
    results: list[list[dict]] = [[] for _ in range(n)]
    fed, state = 0, [{} for _ in range(n)]
    with tqdm(total=n * chat.context_tokens(distances[-1]), desc="recall", unit="tok", smoothing=0) as bar:
        for distance in distances:
            feed_s = [0.0] * n
            for group in feed_groups(chat.pieces[fed : chat.pieces_at[distance]]):
                for i in range(n):
                    state[i] = pool.call(i, "extend_chat", ids=group)
                    feed_s[i] += state[i]["time_s"]
                bar.update(n * len(group))
            fed = chat.pieces_at[distance]
            answers: list[list[dict]] = [[] for _ in range(n)]
            bar.set_postfix_str(f"asking at {distance}")
            for prompt, answer in chat.questions[distance]:
                for i in range(n):
                    answers[i].append(pool.call(i, "probe", prompt_ids=prompt, answer_ids=answer, max_new=max_new))
            for i, spec in enumerate(pool.specs):
                results[i].append(
                    summarize(spec, distance, chat, state[i], feed_s[i], answers[i], facts, values, trained[i])
                )
    for i in range(n):
        pool.call(i, "end_chat")
    return [r for per_config in results for r in per_config]


def summarize(
    spec: Spec,
    distance: int,
    chat: Chat,
    state: dict,
    feed_s: float,
    answers: list[dict],
    facts: tuple[Fact, ...],
    values: list[str],
    trained: int,
) -> dict:
    """One config at one distance: per-fact scores and what the cache held when the questions were asked
    (``feed_s``: the conversation since the previous distance)."""
    per_fact = [
        {
            "key": fact.key,
            "value": value,
            "logprob": sum(a["token_logprobs"]),
            "token_logprobs": a["token_logprobs"],
            "generated": a["generated"],
            "match": value in a["generated"],
            "time_s": a["time_s"],
        }
        for fact, value, a in zip(facts, values, answers)
    ]
    max_position = max(a["max_position"] for a in answers)
    return {
        "config": spec.label,
        "policy": spec.policy,
        "options": spec.options,
        "distance": distance,
        "filler_tokens": chat.filler_tokens(distance),
        "context_tokens": chat.context_tokens(distance),
        "mean_logprob": statistics.mean(f["logprob"] for f in per_fact),
        "exact_match": sum(f["match"] for f in per_fact),
        "n_facts": len(per_fact),
        "kv_bytes": state["kv_bytes"],
        "kept_tokens": state["kept_tokens"],
        "evicted_tokens": state["evicted_tokens"],
        "feed_s": feed_s,
        "questions_s": sum(f["time_s"] for f in per_fact),
        "max_position": max_position,
        "trained_positions": trained,
        "past_trained": max_position >= trained,
        "facts": per_fact,
    }


def render(results: list[dict], args) -> str:
    rows = [
        [
            r["config"],
            f"{r['distance']}*" if r["past_trained"] else str(r["distance"]),
            r["mean_logprob"],
            f"{r['exact_match']}/{r['n_facts']}",
            r["kv_bytes"] / 2**20,
            r["feed_s"],
            r["questions_s"],
        ]
        for r in results
    ]
    text = report.markdown_table(COLUMNS, rows)
    past = [r for r in results if r["past_trained"]]
    if past:
        text += (
            f"\n\\* the questions' positions went past the model's {past[0]['trained_positions']} trained "
            f"positions (largest position id {max(r['max_position'] for r in past)}); run anyway.\n"
        )
    filler = {r["distance"]: r["filler_tokens"] for r in results}
    text += (
        f"\n{results[0]['n_facts']} facts (seed {args.seed}), one per early user turn; then turns of other "
        f"conversation (filler tokens per distance: {', '.join(f'{d}: {n}' for d, n in filler.items())}); "
        f"each fact asked on its own copy of the cache. Log-prob: the value's tokens after the question and the "
        f"answer's lead-in, teacher-forced, summed per fact, mean over facts. Exact match: the value appears in "
        f"{args.new} greedy tokens. KV held: `cache.nbytes()` when the questions are asked. Feed: seconds to "
        f"feed the conversation since the previous distance; Questions: seconds for all questions. "
        f"Model: {args.model}.\n"
    )
    return text


def plot(path, results: list[dict]) -> None:
    """Mean answer log-prob and exact-match rate against distance, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["config"] for r in results):
        mine = [r for r in results if r["config"] == label]
        xs = [r["distance"] for r in mine]
        axes[0].plot(xs, [r["mean_logprob"] for r in mine], marker=".", label=label)
        axes[1].plot(xs, [r["exact_match"] / r["n_facts"] for r in mine], marker=".", label=label)
    for ax, ylabel in zip(axes, ("mean answer log-prob", "exact match (fraction of facts)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens of other turns before the question")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=8)
    fig.suptitle("Recall of facts planted early in a chat")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated policies (+ :key=value options)")
    parser.add_argument("--distances", default=DEFAULT_DISTANCES, help="tokens of other turns before the questions")
    parser.add_argument("--facts", type=int, default=len(FACTS), help=f"facts planted (1-{len(FACTS)})")
    parser.add_argument("--seed", type=int, default=0, help="draws the facts' values")
    parser.add_argument("--new", type=int, default=8, help="greedy tokens per answer (exact match)")
    parser.add_argument("--passage-words", type=int, default=120, help="words per quoted or continued passage")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs = SMOKE_CONFIGS if args.configs == DEFAULT_CONFIGS else args.configs
        args.distances = SMOKE_DISTANCES if args.distances == DEFAULT_DISTANCES else args.distances
        args.new, args.passage_words = min(args.new, 4), min(args.passage_words, 8)
    if not 1 <= args.facts <= len(FACTS):
        parser.error(f"--facts must be 1-{len(FACTS)}, got {args.facts}")
    distances = sorted({int(d) for d in args.distances.split(",") if d.strip()})
    if not distances or distances[0] < 1:
        parser.error(f"--distances must be positive token counts, got {args.distances!r}")
    report.apply_smoke(args)
    start = report.run_start()
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    facts = FACTS[: args.facts]
    values = draw_values(facts, args.seed)
    synthetic = args.smoke and not data_available(args.data_dir)
    with Pool(make_specs(args, configs), inline=args.inline) as pool:
        chat = build_chat(pool, facts, values, distances, args.passage_words, args.data_dir, synthetic)
        results = ask(pool, chat, distances, facts, values, args.new)
    out = report.out_dir(args)
    text = render(results, args)
    (out / "recall.md").write_text(text)
    report.write_json(
        out / "recall.json",
        {"meta": report.meta(args, start), "args": vars(args), "distances": distances, "results": results},
    )
    plot(out / "recall.png", results)
    print(text)


if __name__ == "__main__":
    main()
