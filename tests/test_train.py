"""The training stage: data order, scoring and validation metrics by hand, determinism, exact resume
from a checkpoint, LoRA, sequence-to-sequence models, NaN handling, and one-line errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TrainConfig, TrainStage1Config, load_section
from pipeline.errors import ConfigError, PipelineError
from pipeline.modeling import RESPONSE, ROT, DialogModel, format_target, load_dialog_model, train_tokenizer
from pipeline.schemas import GROUPS
from pipeline import scoring
from pipeline.stages import train

SAFE = ["that sounds hard, want to talk about it?", "i'm sorry, that must hurt.", "let's find a kinder way.",
        "you could ask a friend for help.", "it's okay to feel upset."]
UNSAFE = ["just punch him.", "lie to everyone, who cares.", "steal it, nobody will know.",
          "you deserve to suffer.", "go ahead and cheat."]
CONTEXTS = ["my brother took my bike.", "i failed my exam today.", "should i lie to my boss?",
            "my friend ignored me.", "i want to get back at him."]
ROTS = ["It's wrong to hurt people.", "You should be honest.", ""]


def group_rows(n_groups: int, negatives: int = 3, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n_groups):
        rot = ROTS[i % len(ROTS)]
        rows.append({
            "group_id": f"g{i}", "corpus": "prosocial_dialog", "split": "train", "dialogue_id": str(i),
            "turn_index": 0, "context": [CONTEXTS[(i + 1) % 5], CONTEXTS[i % 5]], "persona": [],
            "emotion": None, "safety_label": "__needs_caution__", "positive": SAFE[i % 5],
            "rots": [rot] if rot else [],
            "negatives": [{"text": UNSAFE[(i + k) % 5], "source": "hard", "severity": 0.25 * (k + 1)}
                          for k in range(negatives)],
        })
    return rows


def write_groups(folder: Path, n_train: int = 12, n_validation: int = 4, negatives: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(group_rows(n_train, negatives), schema=GROUPS), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(group_rows(n_validation, negatives, offset=100), schema=GROUPS),
                   folder / "validation.parquet")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads' spinning
    makes each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    texts = SAFE + UNSAFE + CONTEXTS + ROTS
    return train_tokenizer(texts * 4, vocab_size=400)


def save_tiny(tokenizer, folder: Path, seq2seq: bool = False) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    if seq2seq:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            decoder_start_token_id=tokenizer.eos_token_id, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                           n_positions=256, **ids))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory) -> Path:
    return save_tiny(tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory) -> Path:
    return write_groups(tmp_path_factory.mktemp("groups"))


# 12 training groups in batches of 4: 3 steps an epoch; the 4 validation groups are one scoring batch.
CONFIG = TrainConfig(batch_groups=4, eval_batch_groups=8, warmup_steps=2, max_source_tokens=48, max_target_tokens=32)
STAGE = TrainStage1Config(epochs=2, learning_rate=3e-3)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def markers(tokenizer) -> DialogModel:
    """A tokenizer with the markers as a DialogModel that can encode groups (no model needed)."""
    return DialogModel(None, tokenizer, False)


def validation_of(dm: DialogModel, table: pa.Table, config: TrainConfig = CONFIG) -> dict[str, float]:
    """A model's metrics on a group table by the validation path (`per_group_scores` and its sums)."""
    groups = scoring.encode_groups(dm, table, config)
    dm.model.eval()
    per_group = scoring.per_group_scores(scoring.GroupScorer(dm), groups, list(range(len(groups))), config)
    return scoring.validation_metrics(scoring.validation_sums(per_group))


# --- data -----------------------------------------------------------------------------------------


def test_epoch_batches_are_seeded_permutations_split_across_processes():
    one = train.epoch_batches(10, 3, seed=1, epoch=0)
    assert [len(b) for b in one] == [3, 3, 3, 1]
    assert sorted(i for b in one for i in b) == list(range(10))
    assert one == train.epoch_batches(10, 3, seed=1, epoch=0)
    assert one != train.epoch_batches(10, 3, seed=1, epoch=1)
    assert one != train.epoch_batches(10, 3, seed=2, epoch=0)
    # Two processes: micro-batches 0, 2 and 1, 3 of the same order; nothing shared.
    rank0, rank1 = (train.epoch_batches(10, 3, 1, 0, world_size=2, rank=r) for r in (0, 1))
    assert rank0 == [one[0], one[2]] and rank1 == [one[1], one[3]]
    # Three processes: the fourth micro-batch would leave two of them short, so it is dropped.
    assert [len(train.epoch_batches(10, 3, 1, 0, 3, r)) for r in range(3)] == [1, 1, 1]


def test_negatives_share_the_positives_rot_and_only_reply_tokens_are_compared(tokenizer, groups_dir):
    table = scoring.read_groups(groups_dir, "train")
    groups = scoring.encode_groups(markers(tokenizer), table, CONFIG)
    assert len(groups) == 12 and groups.negatives == 3
    assert groups.severity[0].tolist() == [0.25, 0.5, 0.75]
    rot, response = tokenizer.convert_tokens_to_ids(ROT), tokenizer.convert_tokens_to_ids(RESPONSE)
    first = groups.target_ids[0]  # group 0 has the RoT "It's wrong to hurt people."
    rot_prefix = tokenizer(f"{ROT} It's wrong to hurt people. ", add_special_tokens=False)["input_ids"]
    for ids, start in zip(first, groups.reply_starts[0]):
        assert ids[: len(rot_prefix)] == rot_prefix and ids[0] == rot
        # The reply's tokens start after <|response|>: the marker is shared, not part of the reply's score.
        assert start == len(rot_prefix) + 1 and ids[start - 1] == response and ids[-1] == tokenizer.eos_token_id
    no_rot = groups.target_ids[2]  # group 2 has no RoT: the target starts at <|response|>
    assert all(ids[0] == response for ids in no_rot) and groups.reply_starts[2] == [1, 1, 1, 1]
    # The same ids as tokenizing each whole target text at once.
    rows = table.to_pylist()
    for g in range(3):
        texts = [format_target(t, rows[g]["rots"] or []) for t in [rows[g]["positive"]] + [n["text"] for n in rows[g]["negatives"]]]
        assert groups.target_ids[g] == [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                        for t in texts]
    plain = scoring.encode_groups(markers(tokenizer), table, dataclasses.replace(CONFIG, rot_target=False))
    assert all(ids[0] == response for ids in plain.target_ids[0])


LONG = "that sounds really hard, and i am so sorry it happened to you today. " * 3


def rows_with_cut_targets(n_groups: int, offset: int, long_positives: list[int], long_negatives: list[tuple[int, int]]):
    """`group_rows` with the positive of the groups `long_positives` and the negatives (group, k) of
    `long_negatives` replaced by `LONG`, far over CONFIG.max_target_tokens."""
    rows = group_rows(n_groups, offset=offset)
    for g in long_positives:
        rows[g]["positive"] = LONG
    for g, k in long_negatives:
        rows[g]["negatives"][k]["text"] = LONG
    return rows


def test_a_cut_target_has_no_eos_and_is_counted_as_positive_or_negative(tokenizer):
    """The old cut kept eos after the last kept token (teaching early stopping, and weighing an
    end-of-reply in a cut negative's score); a cut target is now its first max_target_tokens tokens."""
    table = pa.Table.from_pylist(rows_with_cut_targets(3, 0, [0], [(1, 2), (2, 0)]), schema=GROUPS)
    groups = scoring.encode_groups(markers(tokenizer), table, CONFIG)
    eos, limit = tokenizer.eos_token_id, CONFIG.max_target_tokens
    assert groups.cut.tolist() == [[True, False, False, False], [False, False, False, True], [False, True, False, False]]
    assert groups.cut_counts() == {"positives": 1, "negatives": 2}
    for g, k in [(0, 0), (1, 3), (2, 1)]:
        ids = groups.target_ids[g][k]
        rot = ROTS[g % len(ROTS)]
        full = tokenizer(format_target(LONG, [rot] if rot else []), add_special_tokens=False)["input_ids"]
        assert ids == full[:limit] and eos not in ids
    uncut = [ids for g in range(3) for k, ids in enumerate(groups.target_ids[g]) if not groups.cut[g, k]]
    assert all(ids[-1] == eos and eos not in ids[:-1] and len(ids) <= limit for ids in uncut)


def test_a_rot_that_fills_the_target_leaves_the_group_with_tied_empty_replies(tokenizer, caplog):
    rows = group_rows(1)
    rows[0]["rots"] = [LONG]  # shared by the positive and every negative: no reply fits after it
    groups = scoring.encode_groups(markers(tokenizer), pa.Table.from_pylist(rows, schema=GROUPS), CONFIG)
    assert "4 of 4 targets lost their whole reply" in caplog.text
    assert groups.reply_starts == [[CONFIG.max_target_tokens] * 4] and groups.cut.all()
    scorer = FakeScorer({groups.prompt_ids[0][0]: [[-1.0] * CONFIG.max_target_tokens] * 4})
    per_group = scoring.per_group_scores(scorer, groups, [0], CONFIG)
    assert per_group["positive_score"].tolist() == [0.0] and per_group["negative_score"].tolist() == [0.0]
    assert per_group["ranked_first"].tolist() == [0.0]  # a tie is not ranked first
    assert per_group["positive_tokens"].tolist() == [CONFIG.max_target_tokens]  # the RoT still counts for CE


class FakeScorer:
    """Stands in for the model: fixed per-token log-probabilities for each candidate, looked up by
    the source's first token id."""

    def __init__(self, rows: dict[int, list[list[float]]]):
        self.rows = rows

    def __call__(self, sources, targets, candidates):
        width = max(len(t) for t in targets)
        logps, mask = torch.zeros(len(targets), width), torch.zeros(len(targets), width, dtype=torch.long)
        for i, target in enumerate(targets):
            values = self.rows[sources[i // candidates][0]][i % candidates]
            assert len(values) == len(target)
            logps[i, : len(values)], mask[i, : len(values)] = torch.tensor(values), 1
        return logps, mask


def test_scores_and_validation_metrics_by_hand():
    # Two groups of a positive and two negatives; targets 0..2 of group 0 have a 1-token RoT prefix.
    groups = scoring.EncodedGroups(
        prompt_ids=[[5], [6]],
        target_ids=[[[1, 2, 3], [1, 2, 3], [1, 2]], [[2, 3], [2, 3], [2, 3]]],
        reply_starts=[[1, 1, 1], [0, 0, 0]],
        severity=torch.tensor([[1.0, 0.5], [0.0, 0.0]]),
        cut=torch.zeros(2, 3, dtype=torch.bool),
    )
    scorer = FakeScorer({5: [[-9.0, -1.0, -1.0], [-9.0, -2.0, -4.0], [-9.0, -0.5]],
                         6: [[-2.0, -2.0], [-1.0, -1.0], [-3.0, -3.0]]})
    logps, mask, scores = scoring.score_batch(scorer, groups, [0, 1], 3, length_normalized=True)
    # The RoT token (-9) is left out of the reply scores: group 0 scores -1, -3, -0.5.
    assert scores.tolist() == [[-1.0, -3.0, -0.5], [-2.0, -1.0, -3.0]]
    summed = scoring.score_batch(scorer, groups, [0, 1], 3, length_normalized=False)[2]
    assert summed.tolist() == [[-2.0, -6.0, -0.5], [-4.0, -2.0, -6.0]]
    per_group = scoring.per_group_scores(scorer, groups, [0, 1], dataclasses.replace(CONFIG, eval_batch_groups=1))
    assert per_group["ranked_first"].tolist() == [0.0, 0.0]
    assert per_group["negative_score"].tolist() == [(-3 - 0.5) / 2, (-1 - 3) / 2]
    assert per_group["positive_nll"].tolist() == [11.0, 4.0] and per_group["positive_tokens"].tolist() == [3.0, 2.0]
    metrics = scoring.validation_metrics(scoring.validation_sums(per_group))
    # Neither positive beats both its negatives; positive NLL = (9 + 1 + 1) + (2 + 2) over 5 tokens.
    assert metrics["ranking_accuracy"] == 0.0 and metrics["groups"] == 2
    assert metrics["positive_score"] == pytest.approx((-1 - 2) / 2)
    assert metrics["negative_score"] == pytest.approx(((-3 - 0.5) / 2 + (-1 - 3) / 2) / 2)
    assert metrics["score_gap"] == pytest.approx(-1.5 - (-1.875))
    assert metrics["perplexity"] == pytest.approx(math.exp(15 / 5))


def test_group_loss_matches_the_formula_and_skips_negatives_without_the_contrastive_term():
    groups = scoring.EncodedGroups([[5]], [[[2, 3], [2, 3], [2, 3]]], [[0, 0, 0]], torch.tensor([[1.0, 0.0]]),
                                   torch.zeros(1, 3, dtype=torch.bool))
    scorer = FakeScorer({5: [[-1.0, -1.0], [-2.0, -2.0], [-1.0, -3.0]]})
    config = dataclasses.replace(CONFIG, contrastive_weight=0.5, tau=0.5, margin=1.0)
    loss, stats = train.group_loss(scorer, groups, [0], config)
    # s+ = -1, s1 = -2 (margin 1), s2 = -2 (margin 0): log(1 + exp(0 / 0.5) + exp(-1 / 0.5)).
    npair = math.log(1 + math.exp(0.0) + math.exp(-2.0))
    assert stats["ce"].item() == pytest.approx(1.0)
    assert stats["npair"].item() == pytest.approx(npair)
    assert loss.item() == pytest.approx(1.0 + 0.5 * npair)

    calls = []

    def positives_only(sources, targets, candidates):
        calls.append((len(targets), candidates))
        return scorer(sources, targets, candidates)

    loss, stats = train.group_loss(positives_only, groups, [0], dataclasses.replace(config, contrastive_weight=0))
    assert calls == [(1, 1)] and loss.item() == pytest.approx(1.0) and "npair" not in stats


def test_validation_on_a_real_model_agrees_with_one_group_at_a_time(gpt2_dir, groups_dir):
    dm = load_dialog_model(gpt2_dir)
    table = scoring.read_groups(groups_dir, "validation")
    metrics = validation_of(dm, table)
    ranked = 0
    for g in range(table.num_rows):
        one = validation_of(dm, table.slice(g, 1))
        ranked += one["ranking_accuracy"]
    assert metrics["groups"] == 4 and metrics["ranking_accuracy"] == pytest.approx(ranked / 4)
    assert 1 < metrics["perplexity"] < 10 * len(dm.tokenizer)


# --- training -------------------------------------------------------------------------------------


def run_stage(tmp: Path, init: Path, groups: Path, config=CONFIG, stage=STAGE, name="out", live=True):
    out = tmp / name
    record = train.run(config, stage, 1, init, groups, out, live=tmp / f"{name}_live" if live else None,
                       checkpoints=tmp / f"{name}_checkpoints")
    return out, record


def test_training_writes_the_model_and_records_and_improves_ranking(tmp_path, gpt2_dir, groups_dir):
    config = dataclasses.replace(CONFIG, contrastive_weight=1.0)
    out, record = run_stage(tmp_path, gpt2_dir, groups_dir, config, TrainStage1Config(epochs=5, learning_rate=1e-2))
    dm = load_dialog_model(out)  # safetensors, tokenizer with the markers
    assert not dm.is_seq2seq and not any((tmp_path / "out_checkpoints").iterdir())  # emptied at the end
    saved = json.loads((out / "train.json").read_text())
    assert saved["config"]["train"]["tau"] == config.tau and saved["config"]["train_stage1"]["epochs"] == 5
    no_cut = {"positives": 0, "negatives": 0}
    assert saved["steps"] == 5 * 3 and saved["data"] == {"train_groups": 12, "validation_groups": 4, "negatives_per_group": 3,
                                                          "cut_targets": {"train": no_cut, "validation": no_cut}}
    assert "torch" in saved["library_versions"] and "git_commit" in saved
    live = json.loads((tmp_path / "out_live" / "metrics.json").read_text())
    assert live["step"] == 15 and set(live["train"]) >= {"total", "ce", "npair", "score_gap", "lr"}
    assert live["val"]["ranking_accuracy"] == saved["metrics"]["validation"]["ranking_accuracy"]
    plots = tmp_path / "out_live" / "plots" / "metrics"
    assert len((plots / "train" / "total.tsv").read_text().splitlines()) == 1 + 15
    assert len((plots / "val" / "ranking_accuracy.tsv").read_text().splitlines()) == 1 + 6  # step 0 and 5 epochs
    # Trained on contrastive groups, the validation positives gain on their negatives.
    before = validation_of(load_dialog_model(gpt2_dir), scoring.read_groups(groups_dir, "validation"), config)
    after = saved["metrics"]["validation"]
    assert after["score_gap"] > before["score_gap"] and after["perplexity"] < before["perplexity"]
    # The recorded final metrics are those of the saved model.
    rescored = validation_of(dm, scoring.read_groups(groups_dir, "validation"), config)
    assert after == pytest.approx({k: v for k, v in rescored.items() if k != "groups"})


def test_same_seed_gives_the_same_weights_and_metrics(tmp_path, gpt2_dir, groups_dir):
    a, record_a = run_stage(tmp_path, gpt2_dir, groups_dir, name="a")  # 2 epochs: dropout and data order
    b, record_b = run_stage(tmp_path, gpt2_dir, groups_dir, name="b")
    assert_same_weights(a, b)
    assert record_a["metrics"] == record_b["metrics"]
    assert (tmp_path / "a_live" / "metrics.json").read_text() == (tmp_path / "b_live" / "metrics.json").read_text()


def tsv_values(path: Path) -> list[tuple[str, str]]:
    """(step, value) rows of a dvclive plot file."""
    header, *rows = path.read_text().splitlines()
    assert header.split("\t")[0] == "step"
    return [tuple(row.split("\t")) for row in rows]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, gpt2_dir, groups_dir, monkeypatch):
    config = dataclasses.replace(CONFIG, checkpoint_steps=2)  # 3 steps an epoch: checkpoints at 2, 3, 4, 6
    whole, _ = run_stage(tmp_path, gpt2_dir, groups_dir, config, name="whole")

    real, calls = scoring.token_logprobs, {"n": 0}

    def crash_in_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # validation, steps 1-3, validation, step 4, then step 5 crashes
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "token_logprobs", crash_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, gpt2_dir, groups_dir, config, name="resumed")
    # Resuming in the middle of epoch 2 must replay its order and the RNG state.
    assert [p.name for p in (tmp_path / "resumed_checkpoints").glob("step-*")] == ["step-00000004"]
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(scoring, "token_logprobs", real)
    resumed, record = run_stage(tmp_path, gpt2_dir, groups_dir, config, name="resumed")
    assert_same_weights(whole, resumed)
    plots = Path("plots") / "metrics"
    for name in ("train/total.tsv", "train/lr.tsv", "val/perplexity.tsv"):
        assert tsv_values(tmp_path / "whole_live" / plots / name) == tsv_values(tmp_path / "resumed_live" / plots / name)
    assert list((tmp_path / "resumed_checkpoints").iterdir()) == []


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, gpt2_dir, groups_dir, monkeypatch):
    real = scoring.token_logprobs
    calls = {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in step 4, after the checkpoint at the end of epoch 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "token_logprobs", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, gpt2_dir, groups_dir, name="x")
    assert [p.name for p in (tmp_path / "x_checkpoints").glob("step-*")] == ["step-00000003"]
    monkeypatch.setattr(scoring, "token_logprobs", real)
    other, one_epoch = dataclasses.replace(CONFIG, margin=0.0), TrainStage1Config(epochs=1, learning_rate=3e-3)
    x, _ = run_stage(tmp_path, gpt2_dir, groups_dir, other, one_epoch, name="x", live=False)
    fresh, _ = run_stage(tmp_path, gpt2_dir, groups_dir, other, one_epoch, name="fresh", live=False)
    assert_same_weights(x, fresh)


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, gpt2_dir, groups_dir, monkeypatch):
    real, calls = scoring.token_logprobs, {"n": 0}

    def nan_in_step_three(*args, **kwargs):
        calls["n"] += 1
        logps, mask = real(*args, **kwargs)
        return (logps * float("nan"), mask) if calls["n"] == 1 + 3 else (logps, mask)

    monkeypatch.setattr(scoring, "token_logprobs", nan_in_step_three)
    with pytest.raises(PipelineError, match=r"not finite at step 3 \(epoch 1; total = nan"):
        run_stage(tmp_path, gpt2_dir, groups_dir, live=False)
    assert not (tmp_path / "out").exists()


def test_zero_epochs_copies_the_initial_model_with_its_validation_metrics(tmp_path, gpt2_dir, groups_dir):
    out, record = run_stage(tmp_path, gpt2_dir, groups_dir, stage=TrainStage1Config(epochs=0), live=False)
    assert_same_weights(gpt2_dir, out)
    expected = validation_of(load_dialog_model(gpt2_dir), scoring.read_groups(groups_dir, "validation"))
    assert record["steps"] == 0
    assert record["metrics"]["validation"] == {k: v for k, v in expected.items() if k != "groups"}


def test_cut_targets_are_counted_in_train_json_and_the_log(tmp_path, gpt2_dir, caplog):
    groups = tmp_path / "cut_groups"
    groups.mkdir()
    pq.write_table(pa.Table.from_pylist(rows_with_cut_targets(12, 0, [0, 5], [(3, 1)]), schema=GROUPS),
                   groups / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows_with_cut_targets(4, 100, [], [(0, 0), (0, 2), (2, 1)]), schema=GROUPS),
                   groups / "validation.parquet")
    caplog.set_level("INFO", logger="pipeline.stages.train")
    _, record = run_stage(tmp_path, gpt2_dir, groups, stage=TrainStage1Config(epochs=0), live=False)
    assert record["data"]["cut_targets"] == {"train": {"positives": 2, "negatives": 1},
                                             "validation": {"positives": 0, "negatives": 3}}
    assert "2 positives and 1 negatives of the training groups, 0 and 3 of the validation groups" in caplog.text


def test_lora_adapters_are_merged_into_the_saved_model(tmp_path, gpt2_dir, groups_dir):
    config = dataclasses.replace(CONFIG, lora=dataclasses.replace(CONFIG.lora, enabled=True, r=4, dropout=0.0))
    out, _ = run_stage(tmp_path, gpt2_dir, groups_dir, config, TrainStage1Config(epochs=1, learning_rate=1e-2),
                       live=False)
    trained, initial = weights(out), weights(gpt2_dir)
    assert trained.keys() == initial.keys()  # no adapter tensors left
    changed = [name for name in initial if not torch.equal(trained[name], initial[name])]
    assert changed and all("attn.c_attn" in name for name in changed)  # peft's GPT-2 default target


def test_a_sequence_to_sequence_model_trains(tmp_path, tokenizer, groups_dir):
    bart = save_tiny(tokenizer, tmp_path / "bart", seq2seq=True)
    out, record = run_stage(tmp_path, bart, groups_dir, stage=TrainStage1Config(epochs=1, learning_rate=1e-2),
                            live=False)
    assert load_dialog_model(out).is_seq2seq and record["steps"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(weights(out).values(), weights(bart).values()))


# --- configuration and command line ---------------------------------------------------------------

PARAMS = """
train: {batch_groups: 4, eval_batch_groups: 8, max_source_tokens: 48, max_target_tokens: 32, tau: %s}
train_stage1: {epochs: 1, learning_rate: %s}
train_stage2: {epochs: 1, learning_rate: 1.0e-3}
"""


def write_params(tmp_path: Path, tau="0.5", learning_rate="3.0e-3") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS % (tau, learning_rate))
    return path


def test_repository_params_load(repo_root):
    config = load_section(repo_root / "params.yaml", "train", TrainConfig)
    assert config.tau > 0
    for stage in (1, 2):
        from pipeline.config import TRAIN_STAGES

        load_section(repo_root / "params.yaml", f"train_stage{stage}", TRAIN_STAGES[stage])


def test_help():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--groups" in result.output


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_command_trains_stage_two(tmp_path, gpt2_dir, groups_dir):
    params = write_params(tmp_path)
    result = invoke("--stage", 2, "--init", gpt2_dir, "--groups", groups_dir, "--out", tmp_path / "m",
                    "--live", tmp_path / "live", "--params", params)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "m" / "train.json").read_text())
    assert saved["stage"] == 2 and saved["config"]["train_stage2"]["learning_rate"] == 1e-3
    assert (tmp_path / "m_checkpoints").is_dir() and not list((tmp_path / "m_checkpoints").iterdir())


@pytest.mark.parametrize("tau, learning_rate, message", [
    ("0", "3.0e-3", "train.tau = 0.0 is not allowed: must be greater than 0"),
    ("-1", "3.0e-3", "train.tau = -1.0 is not allowed"),
    ("0.5", "-1.0e-3", "train_stage1.learning_rate = -0.001 is not allowed: must be greater than 0"),
])
def test_bad_parameters_are_one_line_config_errors(tmp_path, gpt2_dir, groups_dir, tau, learning_rate, message):
    result = invoke("--stage", 1, "--init", gpt2_dir, "--groups", groups_dir, "--out", tmp_path / "m",
                    "--params", write_params(tmp_path, tau, learning_rate))
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(ConfigError):
        load_section(tmp_path / "params.yaml", "train" if "tau" in message else "train_stage1",
                     TrainConfig if "tau" in message else TrainStage1Config)


def bad_model_dirs(tmp_path: Path, tokenizer, gpt2_dir: Path) -> dict[str, tuple[Path, str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = tmp_path / "unknown"
    save_tiny(tokenizer, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    plain = tmp_path / "plain_tokenizer"
    save_tiny(tokenizer, plain)
    for name in plain.glob("tokenizer*"):
        name.unlink()
    raw = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "hi": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(plain)
    return {
        "missing": (tmp_path / "nowhere", "model folder not found"),
        "empty": (empty, "not a model folder (no config.json)"),
        "unknown kind": (unknown, "cannot load the model"),
        "tokenizer": (plain, "tokenizer lacks the special tokens"),
    }


def test_bad_inputs_are_one_line_errors(tmp_path, tokenizer, gpt2_dir, groups_dir):
    params = write_params(tmp_path)
    for what, (init, message) in bad_model_dirs(tmp_path, tokenizer, gpt2_dir).items():
        result = invoke("--stage", 1, "--init", init, "--groups", groups_dir, "--out", tmp_path / "m", "--params", params)
        assert result.exit_code == 2, what
        assert message in result.output and str(init) in result.output, (what, result.output)
        assert len(result.output.strip().splitlines()) == 1, what
    result = invoke("--stage", 1, "--init", gpt2_dir, "--groups", tmp_path / "no_groups", "--out", tmp_path / "m",
                    "--params", params)
    assert result.exit_code == 2 and "no_groups: groups folder not found" in result.output
    uneven = write_groups(tmp_path / "uneven")
    rows = group_rows(3)
    rows[1]["negatives"] = rows[1]["negatives"][:1]
    pq.write_table(pa.Table.from_pylist(rows, schema=GROUPS), uneven / "validation.parquet")
    result = invoke("--stage", 1, "--init", gpt2_dir, "--groups", uneven, "--out", tmp_path / "m", "--params", params)
    assert result.exit_code == 2 and "same number (at least 1) of negatives" in result.output
    assert not (tmp_path / "m").exists()


def test_inputs_longer_than_the_models_positions_are_rejected(tmp_path, gpt2_dir, groups_dir):
    config = dataclasses.replace(CONFIG, max_source_tokens=200, max_target_tokens=64)
    with pytest.raises(ConfigError, match="= 265 is not allowed: the model at .* has 256 positions"):
        run_stage(tmp_path, gpt2_dir, groups_dir, config)


def test_gradient_accumulation_takes_fewer_optimizer_steps(tmp_path, gpt2_dir, groups_dir):
    config = dataclasses.replace(CONFIG, grad_accum_steps=2)  # 3 micro-batches an epoch: steps of 2 and 1
    _, record = run_stage(tmp_path, gpt2_dir, groups_dir, config, TrainStage1Config(epochs=1), live=False)
    assert record["steps"] == 2


def test_training_resolves_precision_by_the_shared_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train.precision = 'fp16' is not allowed here: fp16 needs a GPU"):
        train.make_accelerator(dataclasses.replace(CONFIG, precision="fp16"))


def test_processes_above_one_relaunch_the_same_command_under_torchrun(monkeypatch):
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append(command) or subprocess.CompletedProcess(command, 3))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert train.needs_launcher(dataclasses.replace(CONFIG, processes=2))
    assert not train.needs_launcher(CONFIG)
    assert train.relaunch(4, ["train", "--stage", "1", "--out", "a b"]) == 3
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                      "-m", "pipeline", "train", "--stage", "1", "--out", "a b"]]
    monkeypatch.setenv("LOCAL_RANK", "0")  # a worker the launcher started runs the stage itself
    assert not train.needs_launcher(dataclasses.replace(CONFIG, processes=2))


@pytest.mark.slow
def test_two_processes_train_with_ddp_on_cpu(tmp_path, gpt2_dir, repo_root):
    """train.processes: 2 relaunches the command under torchrun with two CPU processes (gloo): each
    takes half the micro-batches; validation is summed."""
    import os
    import subprocess
    import sys

    groups = write_groups(tmp_path / "groups", n_train=16, n_validation=5)  # 4 micro-batches: 2 per process
    params = write_params(tmp_path)
    params.write_text(params.read_text().replace("train: {", "train: {processes: 2, "))
    command = [sys.executable, "-m", "pipeline", "train",
               "--stage", "1", "--init", str(gpt2_dir), "--groups", str(groups), "--out", str(tmp_path / "m"),
               "--live", str(tmp_path / "live"), "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "m" / "train.json").read_text())
    assert saved["processes"] == 2 and saved["steps"] == 2
    single = validation_of(load_dialog_model(tmp_path / "m"), scoring.read_groups(groups, "validation"))
    assert saved["metrics"]["validation"]["ranking_accuracy"] == pytest.approx(single["ranking_accuracy"])
    assert saved["metrics"]["validation"]["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)
