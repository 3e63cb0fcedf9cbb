"""`pipeline/untuned.py`: the untuned base models of two runs side by side, figures checked by hand on
hand-made candidates and a judge that flags one word."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import untuned
from pipeline.errors import DataError


class WordJudge:
    """Unsafe exactly when the reply says "steal"."""

    def predict_unsafe(self, responses, contexts):
        return np.array([0.9 if "steal" in r else 0.1 for r in responses])


def candidates(corpus: str, replies_by_context: list[list[str]], selected: list[int]) -> list[dict]:
    rows = []
    for c, (replies, chosen) in enumerate(zip(replies_by_context, selected)):
        for i, reply in enumerate(replies):
            rows.append({"model": "base", "corpus": corpus, "context_id": f"{corpus}/{c}", "context": [f"turn {c}"],
                         "reference": "we went hiking today", "references": ["we went hiking today"],
                         "candidate_index": i, "response": reply, "selected": i == chosen})
    return rows


def workspace(root, name: str, casual: list[list[str]], judged: list[list[str]], ppl: float):
    folder = root / name
    out = folder / "data" / "candidates" / "base"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(candidates("daily_dialog", casual, [0] * len(casual))), out / "daily_dialog.parquet")
    for corpus in ("diasafety", "toxichat"):
        pq.write_table(pa.Table.from_pylist(candidates(corpus, judged, [1] * len(judged))), out / f"{corpus}.parquet")
    scores = folder / "reports" / "scores" / "base"
    scores.mkdir(parents=True)
    (scores / "eval_scores.json").write_text(json.dumps(
        {"reference_ppl_per_word": {"casual": {"value": ppl, "n": 40}, "adversarial": {"value": ppl * 2, "n": 40}}}))
    return folder


def test_two_runs_side_by_side_by_hand(tmp_path):
    # run a: casual replies equal the reference (F1 1); on each judged context 1 of 2 samples says steal,
    # and the selected (index 1) one is the unsafe one on the first context only
    a = workspace(tmp_path, "a", [["we went hiking today", "x"]] * 3,
                  [["i would steal it", "steal it now"], ["hello there", "i would steal"]], ppl=30.0)
    b = workspace(tmp_path, "b", [["", "we went"]] * 3, [["no", "fine"], ["no", "fine"]], ppl=120.0)
    result = untuned.compare({"smollm2": a, "scratch": b}, WordJudge(), threshold=0.5, samples=200)
    one, two = result["figures"]["smollm2"], result["figures"]["scratch"]
    assert one["ppl_per_word"]["casual"]["value"] == 30.0 and two["ppl_per_word"]["adversarial"]["value"] == 240.0
    assert one["f1_reranked"]["casual"]["value"] == pytest.approx(1.0)
    assert two["f1_reranked"]["casual"]["value"] == 0.0  # the selected reply is empty
    # first sample: the mean over a context's samples (1.0 and 0.5), then over contexts
    assert one["unsafe_rate_first"]["diasafety"]["value"] == pytest.approx(0.75)
    assert one["unsafe_rate_reranked"]["toxichat"]["value"] == pytest.approx(1.0)
    assert two["unsafe_rate_first"]["diasafety"]["value"] == 0.0
    assert two["degenerate_rate_reranked"]["overall"]["value"] == pytest.approx(3 / 7)  # 3 empty of 7 contexts
    shown = result["replies"]
    assert len(shown) == 7 and shown[0]["corpus"] == "daily_dialog" and shown[1]["corpus"] == "diasafety"
    assert shown[0]["replies"] == {"smollm2": "we went hiking today", "scratch": ""}
    report = untuned.render(result)
    assert "| ppl_per_word | casual | 30.0" in report and "`scratch`: (empty)" in report


def test_a_run_without_its_outputs_is_named(tmp_path):
    with pytest.raises(DataError, match="run `dvc repro generate@base score@base` there"):
        untuned.read_run(tmp_path / "missing")


def test_the_command_needs_two_runs(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["untuned", "--run", "a=.", "--judge", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "two or more distinct name=folder" in result.output
