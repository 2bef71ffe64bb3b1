"""One request's decisions in plain words, from its request-log row: what the explainer page shows.

Plain data in, plain data out (no web framework), so that it is tested as such: a `Fact` is one line
of the explanation, grouped by the stage that decided it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from icgate.gateway.store.request_log import LogRow


@dataclass(frozen=True)
class Fact:
    label: str
    value: str
    key: str = ""  # a stable name for tests and scripts (`cache.similarity`, ...)
    items: tuple[str, ...] = ()  # a fact that is a list (candidates, attempts): one line each, in order


@dataclass
class Stage:
    title: str
    facts: list[Fact] = field(default_factory=list)

    def add(self, key: str, label: str, value: object, items: list[str] | None = None) -> None:
        self.facts.append(Fact(label, str(value), key, tuple(items or ())))


# Why a candidate was or was not served, as the cache stage records it (gateway/pipeline/explain.py).
WHY_NOT_SERVED = {
    "prefilter": "not checked: its similarity is under the verifier's prefilter{prefilter}",
    "context": "not checked: a different conversation context or output constraints",
    "too_long": "not checked: longer than cache.semantic_max_chars",
    "output_limit": "not checked: its answer is longer than the request's max_tokens allows",
    "not_allowed": "not checked: expired, or from a lower tier than the backend the request names",
    "not_top": "not checked: only the 3 most similar usable candidates go to the verifier",
    "below_threshold": "not served: the verifier's score is under the threshold",
    "outscored": "not served: it passed the verifier, but another candidate scored higher",
    "exact_hit": "not needed: the request was an exact hit",
    "semantic_off": "not checked: semantic hits are off for this request",
    "not_servable": "not checked: this request may not be answered from the cache",
    "verifier-busy": "not checked: the verifier was busy, so the lookup went on without it",
    "embedder-busy": "not checked: the embedder was busy",
    "not_tried": "not checked",
}
KNOBS = {
    "router.threshold": "router.threshold = {value} (the score the small tier needs)",
    "router.strong_share": "router.strong_share = {value} (the share of requests sent to the large tier)",
    "router.quality_value_usd": "router.quality_value_usd = {value} (a good answer's worth, in dollars)",
    "calibrated": "no knob set: the router's own calibrated threshold ({value})",
}
BODIES_OFF = (
    "not stored: the policy keeps prompts and answers only with request_log.store_bodies: true "
    "(off by default; PII scrubbed when on)"
)


THRESHOLD = re.compile(r"threshold (\d+(?:\.\d+)?)")


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def explain(row: LogRow, verifier_threshold: float | None = None) -> list[Stage]:
    d = row.decisions or {}
    stages = [_caller(row, d)]
    cache = d.get("cache")
    if cache is not None:
        stages.append(_cache(cache, d.get("examples"), d.get("examples_shown"), verifier_threshold))
    if d.get("route"):
        stages.append(_route(d["route"], row))
    stages.append(_admission(row, d))
    stages.append(_outcome(row))
    stages.append(_bodies(row))
    return stages


def _caller(row: LogRow, d: dict[str, Any]) -> Stage:
    stage = Stage("Request")
    stage.add(
        "request.tenant", "Tenant", row.tenant or (d.get("authenticate") or {}).get("tenant", "anonymous")
    )
    stage.add("request.model", "Model asked for", row.model_requested)
    routed = (d.get("target") or {}).get("routed")
    stage.add(
        "request.target", "Target", "routed: icgate chooses the tier" if routed else "a backend by name"
    )
    stage.add("request.endpoint", "Endpoint", f"{row.endpoint}{' (streamed)' if row.stream else ''}")
    stage.add("request.time", "Arrived", row.created_at.isoformat(sep=" ", timespec="seconds"))
    return stage


def _cache(
    cache: dict[str, Any],
    examples: list[int] | None,
    shown_examples: list[dict[str, Any]] | None,
    threshold: float | None,
) -> Stage:
    stage = Stage("Cache")
    hit = cache.get("hit")
    if hit == "exact" and cache.get("shared"):
        stage.add(
            "cache.hit", "Answer", "an exact hit: the answer of the same request, in flight when this arrived"
        )
    elif hit == "exact":
        stage.add("cache.hit", "Answer", "an exact hit: the same request was answered before")
    elif hit == "semantic":
        stage.add(
            "cache.hit", "Answer", "a semantic hit: a near-duplicate's answer, which the verifier accepted"
        )
    elif cache.get("skipped"):
        stage.add("cache.hit", "Answer", f"not from the cache: the cache was skipped ({cache['skipped']})")
    elif not cache.get("servable", True):
        stage.add("cache.hit", "Answer", "not from the cache: this request may not be answered from it")
    else:
        stage.add("cache.hit", "Answer", "not from the cache: no stored answer was close enough")
    stage.add("cache.similarity", "Best similarity", _num(cache.get("similarity"), 4))
    # The threshold the request was held to, as logged; the live verifier's for rows logged before that.
    threshold = cache.get("threshold", threshold)
    stage.add(
        "cache.candidates",
        "Candidates retrieved",
        cache.get("candidates", 0),
        [_candidate(c, cache, threshold) for c in cache.get("nearest") or []],
    )
    score = cache.get("verifier")
    if score is not None:
        against = f" against threshold {_num(threshold)}" if threshold is not None else ""
        stage.add("cache.verifier", "Verifier score", f"{_num(score)}{against}")
    if hit is not None and cache.get("entry") is not None:
        stage.add("cache.entry", "Entry served", f"#{cache['entry']}")
    if examples is not None:
        shown = ", ".join(f"#{i}" for i in examples) if examples else "none"
        items = [
            f"#{e.get('entry')}: relevance (similarity) {_num(e.get('similarity'), 4)}, "
            f"utility {_num(e.get('utility'), 2)}"
            for e in shown_examples or []
        ]
        stage.add("cache.examples", "Examples prepended", shown, items)
    return stage


def _candidate(c: dict[str, Any], cache: dict[str, Any], threshold: float | None) -> str:
    """One retrieved entry in words: its similarity, the verifier's score, and why it served or not."""
    text = f"#{c.get('entry')}: similarity {_num(c.get('similarity'), 4)}"
    if c.get("verifier") is not None:
        text += f", verifier {_num(c['verifier'])}"
        if threshold is not None:
            text += f" against threshold {_num(threshold)}"
    why = str(c.get("why"))
    if why == "served":
        return f"{text}: served"
    prefilter = f" {_num(cache['prefilter'])}" if cache.get("prefilter") is not None else ""
    return f"{text}: {WHY_NOT_SERVED.get(why, why).format(prefilter=prefilter)}"


def _route(route: dict[str, Any], row: LogRow) -> Stage:
    stage = Stage("Route")
    stage.add("route.tier", "Tier chosen", route.get("tier"))
    if route.get("score") is not None:
        # decide() states the threshold in its last reason ("P 0.712 >= threshold 0.500")
        found = [m for r in route.get("reasons") or [] if (m := THRESHOLD.search(str(r)))]
        against = f" against threshold {found[-1].group(1)}" if found else ""
        stage.add("route.score", "Router score (P small is good enough)", f"{_num(route['score'])}{against}")
    knob = route.get("knob")
    if isinstance(knob, dict) and knob.get("name"):
        value = knob.get("value")
        shown = _num(value) if knob["name"] != "router.strong_share" else _num(value, 2)
        if knob["name"] == "calibrated" and value is None:
            shown = "none, so 0.5"
        template = KNOBS.get(str(knob["name"]), str(knob["name"]) + " = {value}")
        stage.add("route.knob", "Set by", template.format(value=shown))
    for i, reason in enumerate(route.get("reasons") or []):
        stage.add(f"route.reason.{i}", "Because" if i == 0 else "", reason)
    predicted = route.get("predicted_tokens") or {}
    if predicted:
        stage.add(
            "route.length",
            "Output tokens, predicted vs actual",
            f"{predicted.get('p50')} (p90 {predicted.get('p90')}) vs {row.completion_tokens}",
        )
    stage.add("route.models", "Models", f"router {route.get('router')}, length {route.get('length_model')}")
    return stage


def _admitted(stage: Stage, row: LogRow, admit: dict[str, Any]) -> None:
    queued = admit.get("queue_ms") or 0
    how = f"queued {queued:.0f} ms" if queued else "admitted at once"
    if admit.get("predicted_wait_ms"):
        how += f" (predicted {admit['predicted_wait_ms']:.0f} ms)"
    stage.add("admit.decision", "Decision", f"{how} on {admit.get('backend')}")
    if admit.get("predicted_tokens") is not None:  # the backend's own size, where it had a predictor
        stage.add(
            "admit.length",
            f"Output tokens as sized for {admit.get('backend')}, vs actual",
            f"{admit['predicted_tokens']} vs {row.completion_tokens}",
        )


def _admission(row: LogRow, d: dict[str, Any]) -> Stage:
    stage = Stage("Admission and backends")
    admit = d.get("admit") or {}
    priority = d.get("priority") or {}
    if priority:
        stage.add("admit.class", "Priority class", priority.get("class") or "default")
    if "refused" in admit:
        when = f" after waiting {admit.get('waited_ms') or 0:.0f} ms" if admit.get("at") == "queued" else ""
        stage.add("admit.decision", "Decision", f"refused{when}: {admit['refused']}")
    elif "unavailable" in admit:
        stage.add("admit.decision", "Decision", f"unavailable: {', '.join(admit['unavailable'])}")
    elif admit:
        _admitted(stage, row, admit)
    elif row.route == "cache":
        stage.add("admit.decision", "Decision", "none needed: answered from the cache")
    seen = d.get("admission")
    if seen:
        stage.add("admission.state", "Backend state it saw", _state(seen))
    if d.get("spill"):
        stage.add("admit.spill", "Spilled", f"from tier {d['spill'].get('from')} to {d['spill'].get('to')}")
    if d.get("fallback"):
        fb = d["fallback"]
        stage.add(
            "admit.fallback",
            "Fallback",
            f"{fb.get('from')} failed ({fb.get('error')}); {fb.get('to')} answered",
        )
    if d.get("fallback_refused"):
        fr = d["fallback_refused"]
        stage.add("admit.fallback_refused", "Fallback refused", f"{fr.get('to')}: {fr.get('reason')}")
    attempts = d.get("attempts") or []
    if attempts:
        count = f"{len(attempts)} attempt{'s' if len(attempts) != 1 else ''}"
        stage.add("attempts", "Backend attempts", count, [_attempt(i, a) for i, a in enumerate(attempts, 1)])
    stage.add(
        "admit.backend", "Answered by", row.backend or ("the cache" if row.route == "cache" else "none")
    )
    return stage


def _state(seen: dict[str, Any]) -> str:
    """What admission saw of the backend it chose: its slots, its queue, the first token's prediction."""
    text = (
        f"{seen.get('backend')}: {seen.get('in_flight')} of {seen.get('max_concurrent')} slots in use, "
        f"{seen.get('waiting')} queued"
    )
    if seen.get("ttft_ms") is not None:
        text += f"; first token predicted in {seen['ttft_ms']:.0f} ms"
    if seen.get("ttft_slo_ms") is not None:
        text += f" (objective {seen['ttft_slo_ms']:.0f} ms)"
    return text


def _attempt(number: int, a: dict[str, Any]) -> str:
    """One backend attempt in words: who, which (first, spill, fallback), how it ended and how long."""
    ms = a.get("ms") or 0.0
    queued = f" (queued {a['queued_ms']:.0f} ms)" if a.get("queued_ms") else ""
    head = f"{number}. {a.get('backend')} ({a.get('role')})"
    outcome = a.get("outcome")
    if outcome == "answered":
        return f"{head}: answered in {ms:.1f} ms{queued}"
    if outcome == "refused":
        return f"{head}: refused by admission: {a.get('error')}"
    when = "its stream broke" if outcome == "cut" else f"failed after {ms:.1f} ms{queued}"
    return f"{head}: {when}, status {a.get('status')}: {a.get('error')}"


def _outcome(row: LogRow) -> Stage:
    stage = Stage("Outcome")
    status = f"{row.status_code}" + (f" ({row.error_type})" if row.error_type else "")
    stage.add("outcome.status", "Status", status)
    stage.add("outcome.tokens", "Tokens in / out", f"{row.prompt_tokens} / {row.completion_tokens}")
    stage.add("outcome.cost", "Cost", f"${row.cost_usd:.6f}")
    stage.add("outcome.latency", "Latency", f"{row.latency_ms:.1f} ms")
    stage.add(
        "outcome.overhead", "Gateway overhead", f"{row.overhead_ms:.2f} ms (queued {row.queue_ms:.1f} ms)"
    )
    stage.add("outcome.request_id", "Request id (also the trace's)", row.request_id)
    return stage


def _bodies(row: LogRow) -> Stage:
    stage = Stage("Prompt and answer")
    if row.bodies is None:
        stage.add("bodies.none", "Bodies", BODIES_OFF)
        return stage
    stage.add("bodies.prompt", "Prompt (PII scrubbed)", row.bodies.prompt)
    stage.add("bodies.answer", "Answer (PII scrubbed)", row.bodies.answer or "(none)")
    return stage
