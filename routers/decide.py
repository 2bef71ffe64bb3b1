"""The cost-aware decision: from P(the small tier is good enough) and each tier's price to a tier, explained.

A scorer (a trained router) says how likely the small tier's answer is good enough. The decision then
applies one knob, set in the policy:

- `threshold`: small when P >= threshold (what `icgate router calibrate --strong-share/--min-quality`
  computes on labelled data);
- `quality_value_usd`: small when the expected quality loss, (1 - P) x the value of a good answer,
  is below what the large tier costs more for this request (prompt tokens plus predicted output tokens at
  each backend's price, each tier's output at the length that tier is predicted to answer with: a
  verbose large model costs more than its price per token alone says).

Before either, good in-context examples lift P: the key interaction in IC-Cache is that a small model
with a close, high-utility example of a large-model answer does nearly as well as the large model.
The offline preference data has no examples, so the lift is a policy prior (`example_lift`), shown in the
reasons, rather than something the classifier learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

from icgate.routers.base import RouteDecision


@dataclass(frozen=True)
class TierPrice:
    tier: str
    cost_per_1k_input: float
    cost_per_1k_output: float

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.cost_per_1k_input + output_tokens * self.cost_per_1k_output) / 1000.0


@dataclass(frozen=True)
class ExampleSignal:
    """The best retrieved example a small-tier request would get."""

    similarity: float
    utility: float  # 0..1-ish; large-tier answers and good feedback score higher


@dataclass(frozen=True)
class DecisionKnob:
    threshold: float | None = None
    quality_value_usd: float | None = None
    example_lift: float = 0.5  # at most this share of the remaining doubt is removed by a perfect example
    example_min_similarity: float = 0.75  # examples below this similarity do not lift


def lifted(p_small: float, example: ExampleSignal | None, knob: DecisionKnob) -> tuple[float, float]:
    """P after the example lift, and the lift itself (0 without a useful example)."""
    if example is None or example.similarity < knob.example_min_similarity:
        return p_small, 0.0
    closeness = (example.similarity - knob.example_min_similarity) / (1.0 - knob.example_min_similarity)
    strength = knob.example_lift * min(1.0, closeness) * min(1.0, max(0.0, example.utility))
    return p_small + (1.0 - p_small) * strength, strength


def decide(
    p_small: float,
    small: TierPrice,
    large: TierPrice,
    prompt_tokens: int,
    predicted_tokens: int,
    knob: DecisionKnob,
    example: ExampleSignal | None = None,
    large_tokens: int | None = None,
) -> RouteDecision:
    """The tier for one request, with the numbers that decided it. `predicted_tokens` is the small
    tier's predicted output, `large_tokens` the large tier's (None: the same)."""
    p, lift = lifted(p_small, example, knob)
    reasons = [f"P(small good enough) {p_small:.3f}"]
    if lift:
        assert example is not None
        reasons.append(
            f"example similarity {example.similarity:.3f}, utility {example.utility:.2f}: P lifted to {p:.3f}"
        )
    on_large = predicted_tokens if large_tokens is None else large_tokens
    extra_cost = large.cost(prompt_tokens, on_large) - small.cost(prompt_tokens, predicted_tokens)
    if on_large == predicted_tokens:
        reasons.append(f"predicted {predicted_tokens} output tokens; large costs ${extra_cost:.6f} more")
    else:
        reasons.append(
            f"predicted {predicted_tokens} output tokens on {small.tier}, {on_large} on {large.tier}; "
            f"large costs ${extra_cost:.6f} more"
        )
    if knob.quality_value_usd is not None:
        expected_loss = (1.0 - p) * knob.quality_value_usd
        go_small = expected_loss <= extra_cost
        relation = "<=" if go_small else ">"
        reasons.append(f"expected quality loss ${expected_loss:.6f} {relation} extra cost ${extra_cost:.6f}")
    else:
        threshold = 0.5 if knob.threshold is None else knob.threshold
        go_small = p >= threshold
        reasons.append(f"P {p:.3f} {'>=' if go_small else '<'} threshold {threshold:.3f}")
    return RouteDecision(tier=small.tier if go_small else large.tier, score=p, reasons=tuple(reasons))
