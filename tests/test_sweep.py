"""The stage-1 sweep (`pipeline/sweep.py`): its variants against the real preset, and its table collected
from hand-made runs (scores, scored replies and logs), with the paired differences recomputed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline import sweep as S
from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import DataError
from pipeline.experiment import get_dotted, with_changes
from pipeline.schemas import LIKELIHOOD

REPO = Path(__file__).resolve().parents[1]


def test_every_variant_changes_a_setting_of_the_centre():
    centre = with_changes(load_params(REPO / "params.real.yaml"), S.CENTER)
    for variant, changes in S.VARIANTS.items():
        for key, value in changes.items():
            assert get_dotted(centre, key) is not None, (variant, key)
            assert get_dotted(centre, key) != value, (variant, key)  # not a no-op
    assert S.VARIANTS["method"] == {} and S.BASELINE in S.VARIANTS
    # a run's params: the preset, the centre, the variant, and a valid params file
    params = S.run_params(load_params(REPO / "params.real.yaml"), "groups_real", "/m")
    assert get_dotted(params, "mine.stage1_max_groups") == {"train": 300, "validation": 25, "test": 100}
    assert get_dotted(params, "mine.stage1_corpora") == ["diasafety", "toxichat"]


def replies(scores: list[float]) -> pa.Table:
    """Four DiaSafety replies (two safe, two unsafe, one dialogue each) and two ToxiChat ones."""
    rows = []
    for i, score in enumerate(scores):
        corpus = "diasafety" if i < 4 else "toxichat"
        rows.append({"corpus": corpus, "reply_id": f"d{i}/0", "dialogue_id": f"d{i}", "context_id": f"c{i}",
                     "context": [f"context {i}"], "reply": f"reply {i}", "reply_label": "safe" if i % 2 == 0 else "unsafe",
                     "reply_category": None, "responder": None, "score": score, "tokens": 3, "cut": False})
    return pa.Table.from_pylist(rows, schema=LIKELIHOOD)


# Safe replies are 0, 2, 4. AUC = P(score(safe) > score(unsafe)).
REPLIES = {"base": replies([-2.0, -1.0, -3.0, -1.5, -1.0, -2.0]),  # DiaSafety: safe -2, -3 vs unsafe -1, -1.5: 0.0
           "ce": replies([-1.0, -1.2, -3.0, -1.5, -1.0, -2.0]),    # -1 beats both, -3 neither: 0.5
           "method": replies([-1.0, -1.2, -1.1, -1.5, -3.0, -2.0])}  # both safe beat both unsafe: 1.0


def scores(auc: float, ppl: float) -> dict:
    return {"likelihood_auc": {"diasafety": {"value": auc, "ci": [auc - 0.1, auc + 0.1], "n": 4}},
            "reference_ppl_per_word": {"casual": {"value": ppl, "n": 50}, "adversarial": {"value": ppl * 2, "n": 40}},
            "group_ranking_accuracy": {"value": 0.5}}


def shown(*variants: str, prefix: str = "sweep") -> list[dict]:
    def exp(variant):
        params = S.run_params(load_params(REPO / "params.real.yaml"), variant, "/m")
        name = f"{prefix}-{variant}"
        return {"revs": [{"rev": f"rev-{variant}", "name": name, "error": None,
                          "data": {"params": {"params.yaml": {"data": params}}}}]}
    return [{"rev": "workspace", "experiments": None}, {"rev": "base1234567", "experiments": [exp(v) for v in variants]}]


def fake_reads():
    def read_json(rev, path):
        variant = rev.removeprefix("rev-")
        if path == S.SCORES.format(model="base"):
            return scores(0.0, 40.0)
        if path == S.TRAIN_METRICS:
            return {"val": {"ranking_accuracy": 0.75}}
        return scores({"ce": 0.5, "method": 1.0}[variant], 30.0)

    def read_replies(rev, path):
        return REPLIES["base"] if "/base/" in path else REPLIES[rev.removeprefix("rev-")]
    return read_json, read_replies


def test_collect_pairs_each_run_with_ce_and_the_base_on_the_same_replies():
    logs = {"sweep-method": {"train_stage1": {"status": "ran", "seconds": 600.0},
                             "score@base": {"status": "restored", "seconds": 2.0}}}
    results = S.collect(shown("ce", "method"), "sweep", logs, fake_reads(), n_samples=50)
    method = results["runs"]["method"]
    assert method["stage_seconds"] == {"train_stage1": 600.0}  # a restored stage did not run
    assert method["against_ce"]["diasafety"]["difference"] == pytest.approx(1.0 - 0.5)
    assert method["against_base"]["diasafety"]["difference"] == pytest.approx(1.0 - 0.0)
    assert method["against_ce"]["toxichat"]["difference"] == pytest.approx(0.0 - 1.0)  # safe -3 vs unsafe -2
    assert results["runs"]["ce"]["against_ce"] is None
    assert results["base"]["ppl_per_word"]["casual"]["value"] == 40.0
    assert method["validation_ranking_accuracy"] == 0.75
    markdown = S.render(results)
    assert "| base (untuned) | | | 0.000 [-0.100, 0.100] |" in markdown
    assert "| method | the preset | 10.0 | 1.000 [0.900, 1.100] |" in markdown
    assert "+0.500" in markdown and "| ce | `train.contrastive_weight` 0.0 |" in markdown


def test_collect_refuses_a_run_whose_params_contradict_its_variant():
    wrong = shown("ce")
    wrong[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["contrastive_weight"] = 1.0
    with pytest.raises(DataError, match="do not match its variant"):
        S.collect(wrong, "sweep", {}, fake_reads())
    with pytest.raises(DataError, match="no experiment named sweep-<variant>"):
        S.collect(shown("ce", prefix="other"), "sweep", {}, fake_reads())


def test_the_sweep_report_command_writes_json_and_markdown(tmp_path, monkeypatch):
    exps = tmp_path / "exps.json"
    exps.write_text(json.dumps(shown("ce", "method")))
    read_json, read_replies = fake_reads()
    monkeypatch.setattr(S, "git_json", read_json)
    monkeypatch.setattr(S, "git_replies", read_replies)
    monkeypatch.setattr(S, "collect", lambda shown, prefix, times, read=(read_json, read_replies): ORIGINAL(
        shown, prefix, times, read, n_samples=50))
    result = CliRunner().invoke(app, ["experiment", "sweep-report", "--exps", str(exps), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written["runs"]) == {"ce", "method"}
    assert (tmp_path / "out" / "results.md").read_text() == S.render(written)


ORIGINAL = S.collect


def test_an_unknown_variant_is_refused():
    result = CliRunner().invoke(app, ["experiment", "sweep", "--variant", "nope", "--preset", str(REPO / "params.real.yaml")])
    assert result.exit_code == 2 and "--variant = 'nope' is not allowed" in result.stderr
