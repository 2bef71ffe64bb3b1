"""The shipped length predictor on the content-bearing trace's conversations, offline: Kendall's tau, MAE
and median prediction against the true answer lengths (docs/load-benchmark.md). About a minute.

    .venv/bin/python bench/length_on_trace.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from scipy.stats import kendalltau

from bench import content_trace as ct
from icgate.cache.calibrate import default_encoder
from icgate.cache.embed import conversation_text
from icgate.lengths.predict import OutputLengthHeuristic, load_length_model
from icgate.text import estimate_prompt_tokens, last_user_text

pool = ct.load_pool()
items = [i for v in pool.values() for i in v]
encode = default_encoder(None, Path(__file__).resolve().parents[1] / "data" / "models", "onnx-int8")
t = time.time()
texts = [conversation_text(i.messages()) for i in items]
vecs = encode(texts)
print("embedded", len(texts), round(time.time() - t, 1), "s")
model = load_length_model()
heur = OutputLengthHeuristic()
true = np.array([i.output_tokens for i in items])


def stats(name, pred, mask):
    p, y = pred[mask], true[mask]
    tau = kendalltau(p, y).statistic
    print(
        f"  {name:28s} tau {tau:+.2f}  MAE {np.mean(np.abs(p - y)):5.0f}  "
        f"median pred {np.median(p):5.0f} (true {np.median(y):.0f})"
    )


preds = {}
for label, emb in (("learned + embedding", True), ("learned, no embedding", False)):
    preds[label] = np.array(
        [
            model.predict(
                v if emb else None,
                estimate_prompt_tokens({"messages": i.messages()}, "chat"),
                last_user_text(i.messages()),
            ).p50
            for i, v in zip(items, vecs, strict=True)
        ]
    )
preds["heuristic"] = np.array(
    [
        heur.predict(
            None, estimate_prompt_tokens({"messages": i.messages()}, "chat"), last_user_text(i.messages())
        ).p50
        for i in items
    ]
)
preds["constant (pool mean)"] = np.full(len(items), true.mean()) + np.random.default_rng(0).normal(
    0, 1e-6, len(items)
)
srcs = np.array([i.source for i in items])
for src in ["all", "arena-hard", "gsm8k", "meancache"]:
    mask = np.ones(len(items), bool) if src == "all" else srcs == src
    print(src, mask.sum())
    for k, v in preds.items():
        stats(k, v, mask)
