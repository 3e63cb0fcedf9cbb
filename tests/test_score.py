"""The score stage (test-group ranking accuracy, reference perplexity, likelihood safety of the
human-labelled replies, on the model device at `train.precision`), the AUC and same-context pairs by
hand, and the stage-1 sampler that feeds the miner's `generated` source."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline import devices, scoring
from pipeline.cli import app
from pipeline.config import EvaluateConfig, MineConfig, TrainConfig
from pipeline.metrics import separation_auc
from pipeline.modeling import BOT, ROT, format_source, format_target, load_dialog_model
from pipeline.schemas import GROUPS, LIKELIHOOD
from pipeline.stages import score
from pipeline.stages.mine import load_stage1_generator
from tests.test_train import group_rows, validation_of


def write_test_groups(root: Path) -> Path:
    """Stage 1 has groups g0..g5; stage 2 has g6..g9 plus a replayed copy of g0 and g1."""
    (root / "stage1").mkdir(parents=True)
    (root / "stage2").mkdir(parents=True)
    stage1 = group_rows(6)
    stage2 = group_rows(4, offset=6) + stage1[:2]
    pq.write_table(pa.Table.from_pylist(stage1, schema=GROUPS), root / "stage1" / "test.parquet")
    pq.write_table(pa.Table.from_pylist(stage2, schema=GROUPS), root / "stage2" / "test.parquet")
    return root


def test_replayed_groups_count_once(tmp_path):
    table = score.test_groups(write_test_groups(tmp_path / "groups"))
    assert table["group_id"].to_pylist() == [f"g{i}" for i in range(10)]


def test_scores_agree_with_validation_scoring(tmp_path, tiny_dialog_model_dir, normalized_sample_dir):
    groups = write_test_groups(tmp_path / "groups")
    config = TrainConfig(eval_batch_groups=3)  # batches that cut across the groups
    result = score.run(config, EvaluateConfig(bootstrap_samples=200), "tiny", tiny_dialog_model_dir, groups,
                       normalized_sample_dir, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "eval_scores.json").read_text()) == json.loads(json.dumps(result))
    # The same numbers by the training loop's own validation path, over the ten distinct groups.
    expected = validation_of(load_dialog_model(tiny_dialog_model_dir), score.test_groups(groups), TrainConfig())
    accuracy = result["group_ranking_accuracy"]
    assert accuracy["n"] == 10
    assert accuracy["value"] == pytest.approx(expected["ranking_accuracy"])
    assert accuracy["ci"][0] <= accuracy["value"] <= accuracy["ci"][1]
    assert result["reference_ppl"]["value"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_the_interval_resamples_dialogues_not_groups(tmp_path, tiny_dialog_model_dir, normalized_sample_dir):
    """Ten groups of one dialogue are one cluster: every resample draws all of them, so the interval
    is the point value; as ten dialogues the same groups give the ordinary item interval."""
    one_dialogue = tmp_path / "one"
    write_test_groups(one_dialogue)
    for path in one_dialogue.glob("*/test.parquet"):
        table = pq.read_table(path)
        table = table.set_column(table.schema.get_field_index("dialogue_id"), "dialogue_id",
                                 pa.array(["same"] * table.num_rows))
        pq.write_table(table, path)
    config = EvaluateConfig(bootstrap_samples=200)
    clustered = score.run(TrainConfig(), config, "tiny", tiny_dialog_model_dir, one_dialogue, normalized_sample_dir,
                          tmp_path / "a")
    accuracy = clustered["group_ranking_accuracy"]
    assert accuracy["n"] == 10 and accuracy["n_clusters"] == 1
    assert accuracy["ci"] == [pytest.approx(accuracy["value"])] * 2
    separate = score.run(TrainConfig(), config, "tiny", tiny_dialog_model_dir, write_test_groups(tmp_path / "b"),
                         normalized_sample_dir, tmp_path / "b_out")["group_ranking_accuracy"]
    assert separate["n_clusters"] == 10 and separate["value"] == pytest.approx(accuracy["value"])
    assert 0 < separate["value"] < 1  # else every interval is degenerate and the test shows nothing
    assert separate["ci"][1] - separate["ci"][0] > 0


def test_the_model_is_scored_on_the_model_device(tmp_path, tiny_dialog_model_dir, monkeypatch, normalized_sample_dir):
    class Stop(Exception):
        pass

    seen = []

    def first_forward(dm, *args, **kwargs):
        seen.append(next(dm.model.parameters()).device.type)
        raise Stop

    monkeypatch.setattr(scoring, "token_logprobs", first_forward)
    monkeypatch.setattr(devices, "model_device", lambda: "meta")  # where the CPU-only loader never puts a model
    with pytest.raises(Stop):
        score.run(TrainConfig(), EvaluateConfig(bootstrap_samples=100), "tiny", tiny_dialog_model_dir,
                  write_test_groups(tmp_path / "groups"), normalized_sample_dir, tmp_path / "out")
    assert seen == ["meta"]


def test_train_precision_is_honoured(tmp_path, tiny_dialog_model_dir, normalized_sample_dir):
    groups, evaluate = write_test_groups(tmp_path / "groups"), EvaluateConfig(bootstrap_samples=100)
    fp32, bf16 = (score.run(TrainConfig(precision=p), evaluate, "tiny", tiny_dialog_model_dir, groups,
                            normalized_sample_dir, tmp_path / p) for p in ("fp32", "bf16"))
    # bf16 autocast (which runs on a CPU too) rounds the logits: close to fp32, but not equal.
    assert fp32["reference_ppl"]["value"] != bf16["reference_ppl"]["value"]
    assert bf16["reference_ppl"]["value"] == pytest.approx(fp32["reference_ppl"]["value"], rel=0.05)


def test_fp16_without_a_gpu_is_a_one_line_error_naming_the_key(tmp_path, tiny_dialog_model_dir, monkeypatch,
                                                                normalized_sample_dir):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    params = tmp_path / "params.yaml"
    params.write_text("train: {precision: fp16}\nevaluate: {}\n")
    result = CliRunner().invoke(app, ["score", "base", "--model", str(tiny_dialog_model_dir), "--groups",
                                      str(write_test_groups(tmp_path / "groups")), "--normalized",
                                      str(normalized_sample_dir), "--out", str(tmp_path / "out"),
                                      "--params", str(params)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "train.precision = 'fp16' is not allowed here" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_groups_is_a_one_line_error(tmp_path, tiny_dialog_model_dir):
    (tmp_path / "groups" / "stage1").mkdir(parents=True)
    result = CliRunner().invoke(app, ["score", "base", "--model", str(tiny_dialog_model_dir),
                                      "--groups", str(tmp_path / "groups"), "--normalized", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "stage1" in result.output and "not found" in result.output
    assert not (tmp_path / "out").exists()


def test_score_help():
    result = CliRunner().invoke(app, ["score", "--help"])
    assert result.exit_code == 0 and "--groups" in result.output and "--normalized" in result.output


def test_stage1_sampler_gives_k_replies_without_rots_reproducibly(tiny_dialog_model_dir):
    contexts = [["hello there, how are you?"], ["what did you do today?", "i went hiking.", "nice!"], ["hi"]]
    first = load_stage1_generator(tiny_dialog_model_dir, MineConfig(generated_batch_size=2))(contexts, 3)
    again = load_stage1_generator(tiny_dialog_model_dir, MineConfig(generated_batch_size=2))(contexts, 3)
    assert [len(replies) for replies in first] == [3, 3, 3]
    assert all(ROT not in reply for replies in first for reply in replies)
    assert first == again


def test_stage1_sampler_needs_a_model_folder():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--stage1-model"):
        load_stage1_generator(None, MineConfig())


# --- likelihood safety: every labelled reply scored (its records: tests/test_likelihood.py) -----------


@pytest.fixture(scope="module")
def reply_model(tmp_path_factory, normalized_sample_dir):
    """A tiny GPT-2 whose tokenizer knows the sample's safety corpora, with room for whole contexts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.modeling import train_tokenizer

    texts = [t for corpus in ("diasafety", "toxichat")
             for row in pq.read_table(normalized_sample_dir / corpus / "test.parquet").to_pylist()
             for t in row["context"] + [row["response"]]]
    tokenizer = train_tokenizer(texts, vocab_size=1000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    folder = tmp_path_factory.mktemp("reply_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_labelled_replies_are_scored_by_their_likelihood(tmp_path, reply_model, normalized_sample_dir):
    """Every labelled test reply, scored as the model's mean log-probability of `reply</s>` after
    `source <|bot|> <|response|>` (the reply's tokens and eos, not the marker), here recomputed from the
    model's logits one reply at a time."""
    config = TrainConfig(max_source_tokens=300, max_target_tokens=150, eval_batch_groups=5)
    result = score.run(config, EvaluateConfig(bootstrap_samples=200), "tiny", reply_model,
                       write_test_groups(tmp_path / "groups"), normalized_sample_dir, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "likelihood.parquet")
    assert table.schema.equals(LIKELIHOOD)
    rows = table.to_pylist()
    labelled = {c: [r for r in pq.read_table(normalized_sample_dir / c / "test.parquet").to_pylist()
                    if r["reply_label"]] for c in ("diasafety", "toxichat")}
    assert len(rows) == sum(map(len, labelled.values())) and not any(r["cut"] for r in rows)
    assert len({(r["corpus"], r["reply_id"]) for r in rows}) == len(rows)
    dm = load_dialog_model(reply_model)
    for row in rows:
        source = dm.tokenizer(format_source(row["context"]), add_special_tokens=False)["input_ids"] + [
            dm.tokenizer.convert_tokens_to_ids(BOT)]
        target = dm.tokenizer(format_target(row["reply"]), add_special_tokens=False)["input_ids"] + [
            dm.tokenizer.eos_token_id]
        with torch.no_grad():
            logps = torch.log_softmax(dm.model(input_ids=torch.tensor([source + target])).logits[0], dim=-1)
        expected = logps[len(source) - 1:-1].gather(1, torch.tensor(target)[:, None])[1:].mean()  # [0]: <|response|>
        assert target[0] == dm.tokenizer.convert_tokens_to_ids("<|response|>")
        assert row["score"] == pytest.approx(float(expected), abs=1e-5)
        assert row["tokens"] == len(target) - 1
    # ToxiChat's two chatbot replies to one thread answer the same context.
    bots = [r for r in rows if r["corpus"] == "toxichat" and r["responder"] in ("dialogpt", "gpt3")]
    assert bots and all(sum(b["context_id"] == r["context_id"] for b in bots) == 2 for r in bots)
    # eval_scores.json holds what the replies give.
    saved = json.loads((tmp_path / "out" / "eval_scores.json").read_text())
    assert saved["likelihood_auc"] == json.loads(json.dumps(result["likelihood_auc"]))
    safe = np.array([r["reply_label"] == "safe" for r in rows])
    assert saved["likelihood_auc"]["overall"]["value"] == pytest.approx(
        separation_auc(np.array([r["score"] for r in rows]), safe))
    assert saved["likelihood_auc"]["overall"]["n"] == len(rows) and saved["same_context_pairs"]["overall"]["n"] > 0


def test_a_missing_safety_corpus_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_sample_dir):
    (tmp_path / "normalized" / "diasafety").mkdir(parents=True)
    (tmp_path / "normalized" / "diasafety" / "test.parquet").write_bytes(
        (normalized_sample_dir / "diasafety" / "test.parquet").read_bytes())
    result = CliRunner().invoke(app, ["score", "base", "--model", str(tiny_dialog_model_dir), "--groups",
                                      str(write_test_groups(tmp_path / "groups")), "--normalized",
                                      str(tmp_path / "normalized"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "toxichat/test.parquet: file not found" in result.output and "normalize" in result.output
    assert not (tmp_path / "out").exists()


def test_per_word_perplexity_by_hand():
    """exp(summed reply NLL / words) per scope; the RoT and a cut positive are left out."""
    import math
    from types import SimpleNamespace

    table = pa.table({"corpus": ["daily_dialog", "daily_dialog", "diasafety", "diasafety"],
                      "positive": ["a b c", "d e", "f", "g h i j"]})
    # Targets: a one-token RoT head on the first, then reply tokens and eos; the last positive was cut.
    encoded = SimpleNamespace(target_ids=[[[9, 1, 2, 3]], [[1, 2, 3]], [[1, 2]], [[1, 2, 3, 4]]],
                              reply_starts=[[1], [0], [0], [0]],
                              cut=torch.tensor([[False], [False], [False], [True]]))
    mean_logps = torch.tensor([-1.0, -2.0, -0.5, -9.0], dtype=torch.float64)  # per reply token, RoT excluded
    figures = score.per_word_perplexity(table, encoded, {"positive_score": mean_logps}, length_normalized=True)
    daily = (1.0 * 3 + 2.0 * 3) / (3 + 2)  # NLL of 3 reply tokens each, over 5 words
    assert figures["daily_dialog"] == {"value": pytest.approx(math.exp(daily)), "n": 5}
    assert figures["diasafety"] == {"value": pytest.approx(math.exp(0.5 * 2 / 1)), "n": 1}  # the cut one left out
    assert figures["overall"] == {"value": pytest.approx(math.exp((9.0 + 1.0) / 6)), "n": 6}
    assert figures["casual"]["n"] == 5 and figures["adversarial"]["n"] == 1
    summed = score.per_word_perplexity(table, encoded, {"positive_score": -torch.tensor([3.0, 6.0, 1.0, 0.0],
                                                                                         dtype=torch.float64)},
                                       length_normalized=False)
    assert summed["overall"]["value"] == pytest.approx(figures["overall"]["value"])
