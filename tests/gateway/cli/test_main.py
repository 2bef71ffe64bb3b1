"""The `icgate` command line, called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.cache.onnx_models import OnnxPairScorer
from icgate.cache.runtime import pair_scorer_loader
from icgate.cache.verify import CrossEncoderRuntime, HitVerifier
from icgate.gateway.cli import main as cli
from icgate.gateway.config import DEFAULT_POLICY
from tests.gateway.store.test_db import HEAD


@pytest.fixture(autouse=True)
def no_database_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICGATE_DATABASE_URL", raising=False)
    monkeypatch.delenv("ICGATE_DATA_DIR", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_check_policy_accepts_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check-policy", str(DEFAULT_POLICY))
    assert code == 0
    assert out == [f"{DEFAULT_POLICY}: ok (2 backends, routed: auto)"]


def test_check_policy_names_a_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = DEFAULT_POLICY.read_text().replace("    max_concurrent:", "    max_concurent:", 1)
    assert "max_concurent" in text
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "check-policy", str(path))
    assert code == 2
    assert out == []
    assert "backends.0.max_concurent: unknown key" in err
    assert str(path) in err


def test_check_policy_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check-policy", str(tmp_path / "absent.yaml"))
    assert code == 2 and "cannot read policy file" in err


def test_bad_policy_stops_other_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backends: 3\n")
    code, _, err = run(capsys, "db", "upgrade", "--policy", str(path), "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "backends" in err
    assert not (tmp_path / "d").exists()


def test_db_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    code, out, _ = run(capsys, "db", "upgrade", "--data-dir", str(data))
    assert code == 0
    assert out[-1] == f"database at revision {HEAD}"
    assert (data / "icgate.db").is_file()


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    code, out, _ = run(capsys, "keys", "create", "--tenant", "t", "--data-dir", data)
    assert code == 0
    key = out[-1]
    assert key.startswith("icg-") and len(key) > 20 and " " not in key
    assert "for tenant t" in out[-2]
    key_id = out[-2].split()[2]
    assert key_id.isdigit()

    code, out, _ = run(capsys, "keys", "list", "--data-dir", data)
    assert code == 0
    listing = "\n".join(out)
    assert key not in listing
    [row] = [line.split("\t") for line in out if "\t" in line]
    assert row[0] == key_id and row[1] == "t" and row[3] == "active"
    assert key.startswith(row[2]) and len(row[2]) < len(key)

    code, out, _ = run(capsys, "keys", "revoke", key_id, "--data-dir", data)
    assert code == 0 and out[-1] == f"key {key_id} revoked"

    code, out, _ = run(capsys, "keys", "list", "--data-dir", data)
    [row] = [line.split("\t") for line in out if "\t" in line]
    assert row[0] == key_id and row[3] == "revoked"
    assert key not in "\n".join(out)


def test_keys_revoke_unknown_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "revoke", "999", "--data-dir", str(tmp_path / "data"))
    assert code == 1 and "no key with id 999" in err


def test_prepare_exports_the_graphs_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "backends:\n  - {name: small, tier: small, model: openai/m, api_base: 'http://127.0.0.1:9/v1'}\n"
        "cache: {enabled: false}\n"
    )
    code, lines, err = run(capsys, "prepare", "--policy", str(policy), "--data-dir", str(tmp_path))
    assert code == 0, err
    assert "onnx-int8 models ready" in lines[-1] and "dim 384" in lines[-1]  # the default runtime
    [graph] = (tmp_path / "models").glob("embedder-*-int8.onnx")
    made = graph.stat().st_mtime_ns
    code, _, err = run(capsys, "prepare", "--policy", str(policy), "--data-dir", str(tmp_path))
    assert code == 0, err
    assert [graph] == list((tmp_path / "models").iterdir()) and graph.stat().st_mtime_ns == made


def test_prepare_names_a_missing_verifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "backends:\n  - {name: small, tier: small, model: openai/m, api_base: 'http://127.0.0.1:9/v1'}\n"
        f"cache: {{verifier: {tmp_path / 'nowhere.joblib'}}}\n"
    )
    code, _, err = run(capsys, "prepare", "--policy", str(policy), "--data-dir", str(tmp_path))
    assert code == 2 and "nowhere.joblib" in err and "Traceback" not in err


def test_data_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICGATE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert cli.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("ICGATE_DATA_DIR")
    assert cli.default_data_dir() == Path("data")


def test_cache_calibrate_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.cache.synthetic import synthetic_pairs

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"text_a": p.text_a, "text_b": p.text_b, "duplicate": int(p.duplicate)} for p in synthetic_pairs()
    ]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "verifier.joblib"
    code, lines, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--precision", "0.9", "--out", str(out),
        "--cross-encoder-steps", "8", "--tuned-layers", "1", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    calibrated = json.loads(lines[-1])
    assert calibrated["artifact"] == str(out) and calibrated["cross_encoder"]["steps"] == 8
    assert "cross-encoder step 8/8" in err  # progress goes to stderr, the result alone to stdout
    # a new operating point reuses the trained cross-encoder; pairs it was trained on are refused
    again = tmp_path / "again.joblib"
    code, lines, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--precision", "0.8", "--out", str(again),
        "--cross-encoder-from", str(out), "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    reused = json.loads(lines[-1])
    assert reused["cross_encoder"]["reused_from"] == calibrated["version"] and "cross-encoder step" not in err
    first, second = HitVerifier.load(out).cross_encoder, HitVerifier.load(again).cross_encoder
    assert first is not None and second is not None
    texts_a, texts_b = ["How do I cook rice?", "Is it safe?"], ["How can I cook rice?", "What is love?"]
    np.testing.assert_array_equal(first.logits(texts_a, texts_b), second.logits(texts_a, texts_b))
    # ... and can be served on onnxruntime, one order: the artifact says so, the gateway obeys
    onnx_one = tmp_path / "onnx-one.joblib"
    code, lines, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--precision", "0.8", "--out", str(onnx_one),
        "--cross-encoder-from", str(out), "--cross-encoder-runtime", "onnx", "--one-order",
        "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    served = HitVerifier.load(onnx_one, pair_scorer_loader("onnx", tmp_path / "models", threads=1))
    assert served.cross_encoder_runtime == CrossEncoderRuntime("onnx", both_orders=False)
    assert isinstance(served.cross_encoder, OnnxPairScorer) and not served.cross_encoder.both_orders
    one_order = HitVerifier.load(onnx_one).cross_encoder  # torch, told to read one order as recorded
    assert one_order is not None
    np.testing.assert_allclose(
        served.cross_encoder.logits(texts_a, texts_b), one_order.logits(texts_a, texts_b), atol=1e-3
    )
    code, _, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--max-pairs", "40", "--out", str(again),
        "--cross-encoder-from", str(out), "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "trained beside other calibration pairs" in err
    code, _, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--out", str(again),
        "--cross-encoder-from", str(out), "--cross-encoder-steps", "8", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "not both" in err
    # a shallower reader distilled from the trained one: its depth and its teacher are recorded
    student = tmp_path / "student.joblib"
    code, lines, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--precision", "0.8", "--out", str(student),
        "--cross-encoder-steps", "8", "--layers", "1", "--distill-from", str(out),
        "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    distilled = json.loads(lines[-1])["cross_encoder"]
    assert distilled["layers"] == 1 and distilled["distilled_from"] == calibrated["version"], distilled
    assert "teacher logits" in err
    shallow = HitVerifier.load(student).cross_encoder
    assert isinstance(shallow, PairCrossEncoder) and len(shallow.model.bert.encoder.layer) == 1
    code, _, err = run(
        capsys, "cache", "calibrate", "--pairs", str(pairs), "--out", str(again),
        "--distill-from", str(out), "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "a teacher is for training" in err
    code, lines, err = run(
        capsys, "cache", "eval", "--pairs", str(pairs), "--verifier", str(out), "--data-dir", str(tmp_path)
    )
    assert code == 0, err
    result = json.loads(lines[-1])
    assert {"precision", "recall", "f1", "n"} <= set(result) and result["n"] == len(rows)
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


def routing_csv(path: Path, offset: int) -> Path:
    """Arithmetic the weak model gets wrong and the strong one right; trivia both get right."""
    lines = ["idx,prompt,weak-model,strong-model"]
    for i in range(offset, offset + 120):
        lines.append(
            f'{i},"Compute {i * 7 + 13} times {i % 17 + 23}, then subtract {i}. Show each step.",False,True'
        )
        lines.append(f'{i},"Which word is the odd one out: apple, pear, plum or chair number {i}?",True,True')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_router_train_eval_calibrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_csv, other_csv = routing_csv(tmp_path / "train.csv", 0), routing_csv(tmp_path / "other.csv", 1000)
    data_dir = str(tmp_path / "data")
    code, lines, err = run(capsys, "router", "train", "--data", str(train_csv), "--data-dir", data_dir)
    assert code == 0, err
    trained = json.loads(lines[-1])
    assert trained["row"] == 1 and 0.0 <= trained["threshold"] <= 1.0
    code, lines, err = run(capsys, "router", "eval", "--data", str(other_csv), "--data-dir", data_dir)
    assert code == 0, err
    metrics = json.loads(lines[-1])
    assert metrics["router"] == trained["version"] and metrics["n"] == 240 and metrics["skipped_trained"] == 0
    # half the rows need the strong model, so a perfect ordering gives APGR 0.75 (random: 0.5)
    assert metrics["apgr"] >= 0.74 and metrics["cpt80"] == pytest.approx(0.4, abs=0.02)
    code, lines, err = run(
        capsys,
        "router",
        "calibrate",
        "--strong-share",
        "0.5",
        "--data",
        str(other_csv),
        "--data-dir",
        data_dir,
    )
    assert code == 0, err
    calibrated = json.loads(lines[-1])
    assert (
        calibrated["row"] == 2 and calibrated["version"] != trained["version"] and calibrated["rows"] == 240
    )
    # the training file's own rows are left out of an evaluation
    code, lines, err = run(capsys, "router", "eval", "--data", str(train_csv), "--data-dir", data_dir)
    assert code == 0 and json.loads(lines[-1])["skipped_trained"] > 150


def test_router_eval_of_an_unreadable_file_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,weak\nhello,maybe\n")
    code, _, err = run(capsys, "router", "eval", "--data", str(bad), "--data-dir", str(tmp_path))
    assert code == 2 and "icgate router eval:" in err and "Traceback" not in err


def test_length_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for i in range(60):
        long = i % 2 == 0
        prompt = f"Write a long detailed essay about topic {i}" if long else f"Say yes or no: is {i} even?"
        tokens = 800 + i if long else 3
        rows.append(
            {"question_id": f"q{i}", "prompt": prompt, "answers": {"m": {"text": "x", "tokens": tokens}}}
        )
    data = tmp_path / "icgate.lengths.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    data_dir = str(tmp_path / "data")
    code, lines, err = run(
        capsys, "length", "train", "--data", str(data), "--model", "m", "--data-dir", data_dir
    )
    assert code == 0, err
    assert json.loads(lines[-1])["row"] == 1
    code, lines, err = run(
        capsys, "length", "eval", "--data", str(data), "--model", "m", "--data-dir", data_dir
    )
    assert code == 0, err
    result = json.loads(lines[-1])
    assert result["n"] + result["skipped_trained"] == 60 and result["kendall_tau"] > 0.5
    code, _, err = run(
        capsys, "length", "eval", "--data", str(data), "--model", "nobody", "--data-dir", data_dir
    )
    assert code == 2 and "nobody" in err


def test_length_train_from_log_fits_every_backends_kept_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from icgate.gateway.config import load_policy
    from icgate.gateway.store.length_samples import insert_samples
    from tests.gateway.store.test_length_learning import samples

    data_dir = tmp_path / "data"
    code, _, err = run(capsys, "length", "train", "--from-log", "--data-dir", str(data_dir))
    assert code == 2 and "0 answers" in err  # nothing logged yet: a clear refusal, no traceback
    assert "Traceback" not in err
    engine = cli.open_database(load_policy(DEFAULT_POLICY), data_dir)
    logged = samples("small", 120, 1.0) + samples("large", 80, 3.0, seed=1, cap=400)
    insert_samples(engine, logged)
    engine.dispose()
    code, lines, err = run(capsys, "length", "train", "--from-log", "--data-dir", str(data_dir))
    assert code == 0, err
    truncated = sum(s.finish_reason == "length" for s in logged)
    assert 0 < truncated < 80
    assert f"200 answers in the length samples, {truncated} of them truncated" in err
    result = json.loads(lines[-1])
    assert (result["row"], result["data"], result["answers"]) == (1, "length samples, every backend", 200)


def test_serve_takes_a_root_path_for_a_reverse_proxy(tmp_path: Path) -> None:
    from icgate.gateway.api.app import create_app
    from icgate.gateway.api.server import build_server
    from icgate.gateway.config import load_policy
    from icgate.gateway.wiring import Gateway

    args = cli.build_parser().parse_args(["serve", "--root-path", "/llm"])
    policy = cli.with_root_path(load_policy(DEFAULT_POLICY), args.root_path)
    assert policy.server.root_path == "/llm"
    server = build_server(create_app(Gateway(policy, tmp_path, launch_local=False)), "127.0.0.1", 0)
    assert server.config.root_path == "/llm"
    assert cli.with_root_path(policy, None) is policy
    for bad in ("llm", "/llm/", "/a b"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--root-path", bad])
