"""The semantic-hit verifier at request time: is a cached request a safe stand-in for a new one?

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

This module holds only what a request needs: the features, the rules, `HitVerifier` and its versioned
artifact (`HitVerifier.save` sits beside `load` so that one place defines the format). Fitting the
classifier and picking the thresholds on labelled pairs is `cache.calibrate`'s job, which this module
never imports. A plain library: no web framework, no module-level mutable state.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.files import write_atomically

FORMAT_VERSION = 2  # 2: optional cross-encoder (format 1 artifacts still load)
ARTIFACT_KIND = "icgate.hit_verifier"
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "hit_verifier.joblib"
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


def content_words(text: str) -> frozenset[str]:
    """The words of `text` that carry its topic (stopwords aside): what the idf table weighs."""
    return _parse(text).content


def apply_rules(
    texts_a: Sequence[str], texts_b: Sequence[str], scores: npt.ArrayLike
) -> npt.NDArray[np.float64]:
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
        verdict = rule_verdict(text_a, text_b)
        if verdict is not None:
            out[i] = verdict
    return out


def rule_verdict(text_a: str, text_b: str) -> float | None:
    """What `apply_rules` sets a pair's score to (1.0 or 0.0), or None where the verifier decides."""
    a, b = _parse(text_a), _parse(text_b)
    whole = not (a.truncated or b.truncated)
    if (whole and a.normalised == b.normalised) or text_a == text_b:
        return 1.0
    if (a.negated != b.negated or a.numbers != b.numbers) and a.core_content == b.core_content:
        return 0.0
    return None


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
    text_a: str, text_b: str, vec_a: npt.ArrayLike, vec_b: npt.ArrayLike, idf: Idf | None = None
) -> npt.NDArray[np.float32]:
    """One feature row (float32): the scalar features (`SCALAR_FEATURES`), then vec_a*vec_b, |vec_a-vec_b|.

    `idf` weighs words for the idf_* features (a verifier passes the one fitted at calibration; without it
    every word weighs 1). Symmetric in (a, b): swapping the two texts gives the same row.
    """
    rows = pair_features_batch(
        [text_a], [text_b], np.asarray(vec_a)[None, :], np.asarray(vec_b)[None, :], idf
    )
    row: npt.NDArray[np.float32] = rows[0]
    return row


def pair_features_batch(
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    vecs_a: npt.ArrayLike,
    vecs_b: npt.ArrayLike,
    idf: Idf | None = None,
) -> npt.NDArray[np.float32]:
    """`pair_features` for n pairs at once: an (n, len(SCALAR_FEATURES) + 2*dim) float32 array."""
    va = np.asarray(vecs_a, dtype=np.float32)
    vb = np.asarray(vecs_b, dtype=np.float32)
    if not (len(texts_a) == len(texts_b) == len(va) == len(vb)) or va.shape != vb.shape:
        raise ValueError("texts_a, texts_b, vecs_a and vecs_b must have the same length and vector shape")
    idf = idf or Idf({}, 1.0)
    cosines = np.einsum("ij,ij->i", va, vb)
    parsed: dict[str, _Parsed] = {}
    scalars = np.empty((len(texts_a), len(SCALAR_FEATURES)), dtype=np.float32)
    for i, (ta, tb) in enumerate(zip(texts_a, texts_b, strict=True)):
        pa = parsed.get(ta) or parsed.setdefault(ta, _parse(ta))
        pb = parsed.get(tb) or parsed.setdefault(tb, _parse(tb))
        scalars[i] = _scalar_features(pa, pb, float(cosines[i]), idf)
    return np.hstack([scalars, va * vb, np.abs(va - vb)]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class CrossEncoderRuntime:
    """How the cross-encoder's logits were computed when the verifier was calibrated; a request must
    compute them the same way, or the thresholds no longer mean what calibration measured.

    `runtime`: "torch" and "onnx" give the same logits (float32, to rounding), "onnx-int8" other ones
    (int8 weights); `both_orders`: the mean of (a, b) and (b, a), or (request, cached entry) read once.
    Artifacts made before this was recorded were calibrated on torch, both orders.
    """

    runtime: str = "torch"
    both_orders: bool = True


class PairScorer(Protocol):
    """The cross-encoder as the verifier uses it: one logit per pair. `PairCrossEncoder` (torch, what
    calibration trains and saves) and `cache.onnx_models.OnnxPairScorer` (what the gateway serves with)."""

    def logits(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> npt.NDArray[np.float64]: ...


ScorerLoader = Callable[[dict[str, Any], CrossEncoderRuntime], PairScorer]


def torch_scorer(state: dict[str, Any], runtime: CrossEncoderRuntime) -> PairScorer:
    """The cross-encoder on torch, reading pairs as `runtime` says (int8 logits need `cache.runtime`)."""
    if runtime.runtime == "onnx-int8":
        raise ValueError("this verifier was calibrated on int8 logits: load it with cache.runtime")
    encoder = PairCrossEncoder.from_state(state)
    encoder.both_orders = runtime.both_orders
    return encoder


def verifier_features(
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    vecs_a: npt.ArrayLike,
    vecs_b: npt.ArrayLike,
    idf: Idf,
    cross_encoder: PairScorer | None,
) -> npt.NDArray[np.float32]:
    """The classifier's input rows: `pair_features_batch`, plus the cross-encoder's logit if any
    (right after the scalar features: `feature_names(True)`)."""
    rows = pair_features_batch(texts_a, texts_b, vecs_a, vecs_b, idf)
    if cross_encoder is None:
        return rows
    k = len(SCALAR_FEATURES)
    logits = cross_encoder.logits(texts_a, texts_b).astype(np.float32)
    return np.hstack([rows[:, :k], logits[:, None], rows[:, k:]])


# --------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------


class ProbabilityModel(Protocol):
    """What the verifier asks of its classifier (scikit-learn's interface): column 1 is P(same)."""

    def predict_proba(self, features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]: ...


def one_openmp_thread() -> None:
    """Score in the calling thread with one OpenMP thread. The verifier's trees (scikit-learn's gradient
    boosting) open an OpenMP parallel region per tree, 128 per call: with two threads each region wakes
    the other, which then spins. On a busy 2-core machine a 3-pair call cost 67 ms of CPU that way, and
    4 ms with one thread, the other core left to the event loop (docs/performance.md). libgomp keeps
    the count per thread, so the thread that scores calls this once."""
    threadpool_limits(1, user_api="openmp")


@dataclass
class HitVerifier:
    """Cosine prefilter + a fitted classifier over `pair_features` + a probability threshold.

    The classifier is a `PairClassifier` (see `cache.calibrate.fit_classifier` for why that shape).
    `metrics` records what calibration achieved out of fold (precision, recall, n, data file).
    With a `cross_encoder`, its logit is one more scalar feature (it costs MiniLM forward passes per
    candidate above the prefilter, see bench/results/verifier_cost.md: call `score_batch` off the event
    loop). The hard rules (`apply_rules`) decide first: a pair they settle is never scored.
    Artifacts are joblib (pickle) files: load only artifacts you made or trust.
    """

    cosine_threshold: float
    probability_threshold: float
    model: ProbabilityModel
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    dim: int = 384
    idf: Idf = field(default_factory=lambda: Idf({}, 1.0))
    cross_encoder: PairScorer | None = None
    # The cross-encoder's weights as the artifact holds them: what `save` writes, and what a faster
    # runtime is built from (`cache.onnx_models.cross_encoder_graph`).
    cross_encoder_state: dict[str, Any] | None = None
    cross_encoder_runtime: CrossEncoderRuntime = field(default_factory=CrossEncoderRuntime)

    def features(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: npt.ArrayLike, vecs_b: npt.ArrayLike
    ) -> npt.NDArray[np.float32]:
        """The classifier's input rows (`verifier_features` with this verifier's idf and cross-encoder)."""
        return verifier_features(texts_a, texts_b, vecs_a, vecs_b, self.idf, self.cross_encoder)

    def score(self, text_a: str, text_b: str, vec_a: npt.ArrayLike, vec_b: npt.ArrayLike) -> float:
        """Probability that the two texts ask the same thing; 0.0 below the cosine prefilter, 1.0 for the same
        words (case, punctuation, spacing aside) above it."""
        return float(
            self.score_batch([text_a], [text_b], np.asarray(vec_a)[None], np.asarray(vec_b)[None])[0]
        )

    def accept(self, text_a: str, text_b: str, vec_a: npt.ArrayLike, vec_b: npt.ArrayLike) -> bool:
        """A safe semantic hit: clears the cosine prefilter and the probability threshold."""
        return self.score(text_a, text_b, vec_a, vec_b) >= self.probability_threshold

    def score_batch(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: npt.ArrayLike, vecs_b: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        """`score` for n pairs. A pair with a text over MAX_TEXT_CHARS scores 0.0 (never a hit), so one
        pair costs at most parsing MAX_TEXT_CHARS, SEQUENCE_MATCH_BUDGET steps and one cross-encoder
        window, however long the texts."""
        va = np.asarray(vecs_a, dtype=np.float32)
        vb = np.asarray(vecs_b, dtype=np.float32)
        if va.ndim != 2 or va.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {va.shape}")
        scores, undecided = self.rules_first(texts_a, texts_b, va, vb)
        if undecided:
            features = self.features(
                [texts_a[i] for i in undecided], [texts_b[i] for i in undecided], va[undecided], vb[undecided]
            )
            scores[undecided] = self.model.predict_proba(features)[:, 1]
        return scores

    def rules_first(
        self,
        texts_a: Sequence[str],
        texts_b: Sequence[str],
        vecs_a: npt.NDArray[np.float32],
        vecs_b: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float64], list[int]]:
        """What is decided without the model, and what is left to it: every pair's score (0.0 below the
        prefilter or over MAX_TEXT_CHARS, the hard rules' verdict where they settle it, `apply_rules`),
        and the indices of the pairs the model must score. A pair the rules decide needs no features,
        cross-encoder or trees."""
        scores = np.zeros(len(texts_a), dtype=np.float64)
        cosines = np.einsum("ij,ij->i", vecs_a, vecs_b)
        readable = [max(len(a), len(b)) <= MAX_TEXT_CHARS for a, b in zip(texts_a, texts_b, strict=True)]
        keep = np.flatnonzero((cosines >= self.cosine_threshold) & np.array(readable, dtype=bool)).tolist()
        undecided = []
        for i in keep:
            verdict = rule_verdict(texts_a[i], texts_b[i])
            if verdict is None:
                undecided.append(i)
            else:
                scores[i] = verdict
        return scores, undecided

    def accept_batch(
        self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: npt.ArrayLike, vecs_b: npt.ArrayLike
    ) -> npt.NDArray[np.bool_]:
        scores = self.score_batch(texts_a, texts_b, vecs_a, vecs_b)
        cosines = np.einsum("ij,ij->i", np.asarray(vecs_a), np.asarray(vecs_b))
        accepted: npt.NDArray[np.bool_] = (scores >= self.probability_threshold) & (
            cosines >= self.cosine_threshold
        )
        return accepted

    def save(self, path: str | Path) -> Path:
        import joblib
        import sklearn

        payload = {
            "kind": ARTIFACT_KIND,
            "format": FORMAT_VERSION,
            "version": self.version,
            "cosine_threshold": float(self.cosine_threshold),
            "probability_threshold": float(self.probability_threshold),
            "dim": int(self.dim),
            "features": feature_names(self.cross_encoder is not None),
            "cross_encoder": self._cross_encoder_state(),
            "cross_encoder_runtime": dataclasses.asdict(self.cross_encoder_runtime),
            "metrics": self.metrics,
            "idf": {"weights": self.idf.weights, "unseen": self.idf.unseen},
            "sklearn_version": sklearn.__version__,
            "model": self.model,
        }
        buffer = io.BytesIO()
        joblib.dump(payload, buffer, compress=3)
        return write_atomically(path, buffer.getvalue())

    def _cross_encoder_state(self) -> dict[str, Any] | None:
        if self.cross_encoder is None:
            return None
        if isinstance(self.cross_encoder, PairCrossEncoder):
            return self.cross_encoder.state()
        if self.cross_encoder_state is None:
            raise ValueError("this verifier's cross-encoder has no weights to save")
        return self.cross_encoder_state

    @classmethod
    def load(cls, path: str | Path, cross_encoder: ScorerLoader | None = None) -> HitVerifier:
        """The artifact at `path`. Its cross-encoder is built by `cross_encoder(state, runtime)` (default:
        `torch_scorer`; the gateway passes `cache.runtime.pair_scorer_loader`), where `runtime` is how
        calibration computed its logits."""
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
        runtime = CrossEncoderRuntime(**(payload.get("cross_encoder_runtime") or {}))
        if payload.get("features") != feature_names(state is not None):
            raise ValueError(f"{path}: artifact was built with other features; recalibrate")
        return cls(
            cosine_threshold=float(payload["cosine_threshold"]),
            probability_threshold=float(payload["probability_threshold"]),
            model=payload["model"],
            version=str(payload["version"]),
            metrics=dict(payload.get("metrics") or {}),
            dim=int(payload["dim"]),
            idf=Idf(dict(payload["idf"]["weights"]), float(payload["idf"]["unseen"])),
            cross_encoder=None if state is None else (cross_encoder or torch_scorer)(state, runtime),
            cross_encoder_state=state,
            cross_encoder_runtime=runtime,
        )


class PairClassifier:
    """The verifier's model: a gradient-boosted tree ensemble over the scalar pair features plus one more
    feature, the logit of a logistic regression over the embedding parts (vec_a*vec_b, |vec_a-vec_b|).

    `cache.calibrate.fit_classifier` fits both parts (its docstring says why this shape); artifacts pickle
    this class, so it lives here, where a request can unpickle it without the training code. The
    attribute names are those of the artifacts already shipped: renaming one would break them.
    """

    def __init__(
        self, n_scalar: int, embedding_model: Any, trees: Any, seed: int = 0, embedding_c: float = 0.05
    ) -> None:
        self.n_scalar = n_scalar
        self.seed = seed
        self.embedding_c = embedding_c
        self.embedding_model_ = embedding_model
        self.trees_ = trees
        self.classes_ = trees.classes_

    def predict_proba(self, features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        k = self.n_scalar
        logit = self.embedding_model_.decision_function(features[:, k:])
        return np.asarray(self.trees_.predict_proba(np.c_[features[:, :k], logit]), dtype=np.float64)
