"""DExperts (pipeline/dexperts.py, pipeline/stages/experts.py): the logit combination by hand on a
two-token vocabulary, alpha 0 reproducing the guided model's decoding token for token, the experts'
cached steps against full forward passes, the scorer of `score dexperts`, the experts' data, and the
commands with their one-line errors. Models are conftest's tiny random GPT-2 and perturbed copies."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import DExpertsConfig, GenerateConfig
from pipeline.dexperts import (
    ANTIEXPERT, EXPERT, Ensemble, Experts, Guidance, check_same_vocabulary, combine, load_experts, sampling_filters,
)
from pipeline.errors import DataError
from pipeline.modeling import DialogModel, Source, encode_sources, load_dialog_model, token_logprobs
from pipeline.nucleus import Nucleus
from pipeline.sampling import encode_prompts, generate_batch
from pipeline.schemas import NORMALIZED
from pipeline.stages.experts import expert_pairs
from tests.test_generate import assert_one_line_error, invoke, normalized_row, write_split


def perturbed(dm: DialogModel, seed: int, scale: float = 0.5) -> DialogModel:
    """A copy of `dm` with noise on every weight: an expert with the same tokenizer and other logits."""
    model = copy.deepcopy(dm.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return DialogModel(model.eval(), dm.tokenizer, dm.is_seq2seq, dm.path)


@pytest.fixture(scope="module")
def guided(tiny_dialog_model_dir) -> DialogModel:
    dm = load_dialog_model(tiny_dialog_model_dir)
    dm.model.eval()
    return dm


@pytest.fixture(scope="module")
def experts_pair(guided) -> tuple[DialogModel, DialogModel]:
    return perturbed(guided, 1), perturbed(guided, 2)


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def trio(request, guided, experts_pair) -> tuple[DialogModel, DialogModel, DialogModel]:
    """(guided, expert, anti-expert): conftest's GPT-2 and two perturbed copies, or a tiny BART with the
    same tokenizer and two perturbed copies."""
    if request.param == "causal":
        return guided, *experts_pair
    from transformers import BartConfig, BartForConditionalGeneration

    tok = guided.tokenizer
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        init_std=0.3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        decoder_start_token_id=tok.eos_token_id))
    dm = DialogModel(bart.eval(), tok, True, Path("bart"))
    return dm, perturbed(dm, 1), perturbed(dm, 2)


SOURCES = [Source(["hi"]), Source(["what did you do today?", "i went hiking with my dog."]),
           Source(["it's wrong to steal."])]


# --- the combination ----------------------------------------------------------------------------------


def test_the_combination_by_hand_on_a_two_token_vocabulary():
    base = torch.log(torch.tensor([[0.5, 0.5]]))
    expert, antiexpert = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # z + alpha (z_e - z_a) = [log .5 - 1, log .5 + 1]: softmax gives e / (e^-1 + e) to token 1.
    p = torch.softmax(combine(base, expert, antiexpert, 1.0), dim=-1)[0]
    assert p[1].item() == pytest.approx(math.e / (math.e + 1 / math.e), abs=1e-6)  # 0.8808
    p = torch.softmax(combine(base, expert, antiexpert, 2.0), dim=-1)[0]
    assert p[1].item() == pytest.approx(math.e ** 2 / (math.e ** 2 + math.e ** -2), abs=1e-6)
    # The anti-expert's favourite loses: with alpha 0 nothing moves.
    assert torch.equal(combine(base, expert, antiexpert, 0.0), base)
    # Top-p filters the guided model's logits first: token 1 (p 0.1) is outside the 0.5 nucleus, and no
    # alpha brings it back.
    nucleus = sampling_filters(GenerateConfig(top_p=0.5))
    mixed = combine(torch.log(torch.tensor([[0.9, 0.1]])), expert, antiexpert, 10.0, nucleus)
    assert mixed[0, 1].item() == -math.inf and torch.softmax(mixed, dim=-1)[0, 0].item() == 1.0
    # Temperature 2 divides the guided logits before the difference is added (Guidance passes alpha / T).
    scaled = combine(torch.tensor([[2.0, 4.0]]), expert, antiexpert, 0.5, sampling_filters(GenerateConfig(
        temperature=2.0, top_p=1.0)))
    assert scaled.tolist() == [[1.0 - 0.5, 2.0 + 0.5]]


def test_sampling_filters_follow_the_config():
    assert sampling_filters(GenerateConfig(temperature=0.7, top_k=5, top_p=0.9)) == [Nucleus(0.7, 5, 0.9)]
    assert sampling_filters(GenerateConfig(top_p=1.0)) == []
    assert sampling_filters(GenerateConfig(temperature=2.0, top_p=1.0)) == [Nucleus(2.0, 0, 1.0)]
    assert sampling_filters(GenerateConfig(k=1, do_sample=False)) == []


# --- decoding -----------------------------------------------------------------------------------------


def sample(dm, config, seed, experts=None):
    return generate_batch(dm, encode_prompts(dm, SOURCES, config), config, seed, experts=experts)


@pytest.mark.parametrize("config", [
    GenerateConfig(k=3, max_new_tokens=10),  # top-p 0.9
    GenerateConfig(k=2, max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.95),
    GenerateConfig(k=1, do_sample=False, max_new_tokens=10),
], ids=["top_p", "temperature_top_k", "greedy"])
def test_alpha_zero_reproduces_the_guided_models_own_decoding_exactly(trio, config):
    guided, *experts_pair = trio
    alone = sample(guided, config, seed=5)
    steered = sample(guided, config, seed=5, experts=Experts(*experts_pair, alpha=0.0))
    assert steered[0] == alone[0]  # the same tokens
    assert steered[1] == alone[1]  # and the guided model's own log-probabilities (the fluency)
    # The check can fail: a real alpha moves the samples.
    assert sample(guided, config, seed=5, experts=Experts(*experts_pair, alpha=3.0))[0] != alone[0]


def test_the_experts_cached_steps_equal_full_forward_passes(trio):
    """The processor's combined logits at every step, for left-padded prompts of different lengths, equal
    the combination of full teacher-forced passes of the three models over the sampled targets."""
    guided, *experts_pair = trio
    config = GenerateConfig(k=2, max_new_tokens=8, top_p=1.0)
    experts = Experts(*experts_pair, alpha=1.5)
    prompts = encode_prompts(guided, SOURCES, config)
    recorded: list[Guidance] = []

    class Recording(Guidance):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, record=True)
            recorded.append(self)

    import pipeline.dexperts as dexperts

    original = dexperts.Guidance
    dexperts.Guidance = Recording
    try:
        targets, _ = generate_batch(guided, prompts, config, seed=2, experts=experts)
    finally:
        dexperts.Guidance = original
    steps = torch.stack(recorded[0].steps, dim=1)  # (S*k, T, V)
    sources = encode_prompts(guided, SOURCES, config)
    assert len({len(s) for s in sources}) > 1  # padding is exercised (left, for a causal model)
    from pipeline.modeling import target_logits

    full = [target_logits(m, sources, targets, config.k)[0] for m in (guided, *experts_pair)]
    expected = combine(full[0], full[1], full[2], experts.alpha)
    for row, target in enumerate(targets):
        torch.testing.assert_close(steps[row, :len(target)], expected[row, :len(target)], atol=1e-4, rtol=1e-4)


def test_the_ensemble_scores_the_combination_and_alpha_zero_is_the_guided_model(guided, experts_pair):
    sources = guided.format.prompts(guided.tokenizer, SOURCES, 32, False)
    targets = [guided.tokenizer("<|response|> i am fine</s>", add_special_tokens=False)["input_ids"],
               guided.tokenizer("<|response|> go away</s>", add_special_tokens=False)["input_ids"]] * 3
    plain, mask = token_logprobs(guided, sources, targets, 2)
    zero, _ = Ensemble(guided, Experts(*experts_pair, alpha=0.0))(sources, targets, 2)
    torch.testing.assert_close(zero, plain)
    mixed, _ = Ensemble(guided, Experts(*experts_pair, alpha=2.0))(sources, targets, 2)
    e, a = (token_logprobs(m, sources, targets, 2)[0] for m in experts_pair)
    assert not torch.allclose(mixed, plain)
    # By hand: log_softmax(z + 2 (z_e - z_a)) at the target token, from the three models' logits.
    from pipeline.modeling import target_logits

    logits = [target_logits(m, sources, targets, 2)[0] for m in (guided, *experts_pair)]
    labels = target_logits(guided, sources, targets, 2)[1]
    by_hand = torch.log_softmax(logits[0] + 2.0 * (logits[1] - logits[2]), -1).gather(-1, labels.unsqueeze(-1))
    torch.testing.assert_close(mixed, by_hand.squeeze(-1) * mask)


# --- the experts' vocabulary --------------------------------------------------------------------------


def test_an_expert_with_another_tokenizer_is_refused(guided, tmp_path):
    from pipeline.modeling import train_tokenizer

    other = train_tokenizer(["completely different words here", "nothing alike at all"] * 5, vocab_size=280)
    model = copy.deepcopy(guided.model)
    model.resize_token_embeddings(len(other))
    with pytest.raises(DataError, match="tokenizer differs from the guided model's"):
        check_same_vocabulary(guided, DialogModel(model, other, False, tmp_path / "expert"))
    check_same_vocabulary(guided, perturbed(guided, 3))  # the same tokenizer passes


# --- the experts' data --------------------------------------------------------------------------------


def row(corpus, index, response, **fields):
    base = {"corpus": corpus, "split": "train", "dialogue_id": f"d{index}", "turn_index": 1,
            "context": [f"context {index}"], "response": response, "rots": [], "safety_label": None,
            "persona": [], "emotion": None, "unacceptable_responses": [], "derived_split": False}
    return {**base, **fields}


def write_corpora(folder: Path, splits=("train", "validation")) -> Path:
    rows = {
        "diasafety": [row("diasafety", 0, "that sounds hard, i am sorry.", reply_label="safe"),
                      row("diasafety", 1, "you deserve it.", reply_label="unsafe"),
                      row("diasafety", 1, "you deserve it.", reply_label="unsafe")],  # the same pair twice
        "toxichat": [row("toxichat", 0, "lol they are all idiots", reply_label="unsafe"),
                     row("toxichat", 1, "i see your point.", reply_label="safe")],
        "mic": [row("mic", 0, "no, lying hurts people.", unacceptable_responses=[
            {"text": "sure, lie all you want.", "severity": 4}, {"text": "maybe a little.", "severity": 1}])],
        "prosocial_dialog": [row("prosocial_dialog", 0, "you should not lie to friends.",
                                 safety_label="__needs_caution__")],
    }
    for corpus, corpus_rows in rows.items():
        for split in splits:
            (folder / corpus).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([{**r, "split": split} for r in corpus_rows], schema=NORMALIZED),
                           folder / corpus / f"{split}.parquet")
    return folder


def test_expert_pairs_split_safe_and_unsafe_replies(tmp_path):
    normalized = write_corpora(tmp_path / "normalized")
    tables, read = expert_pairs(normalized, DExpertsConfig(), "train", 0)
    assert sorted(tables[EXPERT].column("positive").to_pylist()) == sorted([
        "that sounds hard, i am sorry.", "i see your point.", "no, lying hurts people.",
        "you should not lie to friends."])
    # The repeated DiaSafety pair once; MIC's severity-1 violation left out (min_violation_severity 2).
    assert sorted(tables[ANTIEXPERT].column("positive").to_pylist()) == sorted([
        "you deserve it.", "lol they are all idiots", "sure, lie all you want."])
    assert read["mic"]["pairs"] == {EXPERT: 1, ANTIEXPERT: 1}
    assert expert_pairs(normalized, DExpertsConfig(min_violation_severity=1), "train", 0)[1]["mic"]["pairs"][
        ANTIEXPERT] == 2
    limited, _ = expert_pairs(normalized, DExpertsConfig(), "train", 2)
    assert limited[EXPERT].num_rows == 2 and limited[ANTIEXPERT].num_rows == 2
    with pytest.raises(DataError, match="no unsafe reply for the antiexpert"):
        expert_pairs(normalized, DExpertsConfig(corpora=["prosocial_dialog"]), "train", 0)


# --- the commands -------------------------------------------------------------------------------------


def write_params(path: Path, **dexperts) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "dexperts": {"epochs": 1, "batch_size": 2, "max_source_tokens": 16, "max_target_tokens": 12, **dexperts},
        "generate": {"seed": 0, "max_contexts": 2, "k": 2, "batch_size": 2, "max_new_tokens": 6},
        # No judge corpus among these rows: the halves are tested in tests/test_contexts.py
        "audit": {"models": {}}, "judge": {"corpora": ["daily_dialog"]}}))
    return path


@pytest.fixture(scope="module")
def trained_experts(tiny_dialog_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("experts")
    normalized = write_corpora(folder / "normalized")
    result = invoke("experts", "--init", tiny_dialog_model_dir, "--normalized", normalized, "--out",
                    folder / "experts", "--params", write_params(folder / "params.yaml"))
    assert result.exit_code == 0, result.output
    return folder / "experts"


def test_the_experts_command_trains_both_from_the_base_model(trained_experts, tiny_dialog_model_dir):
    record = json.loads((trained_experts / "experts.json").read_text())
    assert record["corpora"]["diasafety"]["train"]["pairs"] == {EXPERT: 1, ANTIEXPERT: 1}
    assert record["experts"][EXPERT]["pairs"]["train"] == 4 and record["experts"][ANTIEXPERT]["pairs"]["train"] == 3
    base = load_dialog_model(tiny_dialog_model_dir)
    loaded = load_experts(trained_experts, base, alpha=1.0)  # the base's tokenizer: accepted
    weights = [dict(m.model.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
               for m in (base, loaded.expert, loaded.antiexpert)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])  # both trained


def test_generate_dexperts_writes_guided_candidates(tmp_path, trained_experts, tiny_dialog_model_dir,
                                                     fake_safety_scorer):
    from pipeline.config import CORPORA

    normalized = tmp_path / "normalized"
    for corpus in CORPORA:
        write_split(normalized, corpus, [normalized_row(corpus, i) for i in range(3)])
    params = write_params(tmp_path / "params.yaml", alpha=2.0)
    result = invoke("generate", "dexperts", "--model", tiny_dialog_model_dir, "--experts", trained_experts,
                    "--safety", tmp_path / "safety", "--normalized", normalized, "--out", tmp_path / "out",
                    "--params", params)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["model"] == "dexperts" and stats["dexperts"]["alpha"] == 2.0
    assert stats["dexperts"]["filters"] == [{"temperature": 1.0, "top_k": 0, "top_p": 0.9, "width": 256}]
    assert stats["decoding"]["top_p"] == 0.9
    assert all(entry["dexperts_mean_kl"] > 0 for entry in stats["corpora"].values())  # alpha 2 moves the sampling
    assert all(entry["dexperts_kl_tokens"] > 0 for entry in stats["corpora"].values())
    from pipeline.stages.evaluate import guidance  # what evaluate reads of it: the overall weighted by tokens

    kl = guidance(tmp_path, ["out"])["out"]["mean_kl"]
    assert min(kl[c] for c in stats["corpora"]) <= kl["overall"] <= max(kl[c] for c in stats["corpora"])
    table = pq.read_table(tmp_path / "out" / "daily_dialog.parquet")
    assert table.num_rows == 2 * 2 and set(table.column("model").to_pylist()) == {"dexperts"}


def test_generate_refuses_dexperts_without_experts_and_experts_elsewhere(tmp_path, tiny_dialog_model_dir,
                                                                         trained_experts):
    params = write_params(tmp_path / "params.yaml")
    common = ["--safety", tmp_path / "safety", "--normalized", tmp_path, "--out", tmp_path / "out", "--params", params]
    assert_one_line_error(invoke("generate", "dexperts", "--model", tiny_dialog_model_dir, *common), "--experts",
                   "dexperts")
    assert_one_line_error(invoke("generate", "stage2", "--model", tiny_dialog_model_dir, "--experts", trained_experts,
                          *common), "--experts", "'stage2'")
    assert not (tmp_path / "out").exists()


def test_a_missing_expert_folder_is_a_assert_one_line_error(tmp_path, guided):
    (tmp_path / "experts" / EXPERT).mkdir(parents=True)
    with pytest.raises(DataError, match=r"antiexpert: expert folder not found|expert: "):
        load_experts(tmp_path / "experts", guided, 1.0)


def test_a_bad_dexperts_section_names_the_key(tmp_path, tiny_dialog_model_dir):
    params = write_params(tmp_path / "params.yaml", alpha=-1.0)
    assert_one_line_error(invoke("experts", "--init", tiny_dialog_model_dir, "--normalized", tmp_path, "--out",
                          tmp_path / "out", "--params", params), "dexperts.alpha")
    params = write_params(tmp_path / "params.yaml", corpora=["daily_dialog"])
    assert_one_line_error(invoke("experts", "--init", tiny_dialog_model_dir, "--normalized", tmp_path, "--out",
                          tmp_path / "out", "--params", params), "dexperts.corpora")


def test_the_experts_read_only_the_methods_half_of_the_judge_corpora(tmp_path):
    from pipeline.contexts import Halves, judge_half

    normalized = write_corpora(tmp_path / "normalized")
    halves = Halves(["diasafety", "toxichat"], 0.5)
    tables, read = expert_pairs(normalized, DExpertsConfig(), "train", 0, halves)
    used = set(tables[EXPERT].column("positive").to_pylist()) | set(tables[ANTIEXPERT].column("positive").to_pylist())
    for corpus in ("diasafety", "toxichat"):
        rows = pq.read_table(normalized / corpus / "train.parquet").to_pylist()
        judges = judge_half([r["context"] for r in rows], 0.5)
        assert judges.any() and not judges.all()  # both halves are exercised
        assert read[corpus]["rows"] == len(rows) and read[corpus]["method_rows"] == int((~judges).sum())
        for row, is_judges in zip(rows, judges):
            assert (row["response"] in used) != is_judges, row  # the method's rows in, the judge's out
    assert "no, lying hurts people." in used  # MIC is no judge corpus: whole
    validation = expert_pairs(normalized, DExpertsConfig(), "validation", 0, halves)[1]
    assert validation["diasafety"]["method_rows"] == validation["diasafety"]["rows"]  # only train is split


def test_the_mean_kl_from_the_guided_models_own_sampling_is_logged(trio):
    """`Experts.mean_divergence`: 0 at alpha 0, positive otherwise, equal to the KL computed by hand from
    the recorded steps over the tokens sampled up to each row's eos, and reset once read."""
    guided, *experts_pair = trio
    config = GenerateConfig(k=2, max_new_tokens=8, top_p=1.0)
    zero = Experts(*experts_pair, alpha=0.0)
    sample(guided, config, seed=3, experts=zero)
    assert zero.divergence[1] > 0 and zero.mean_divergence() == pytest.approx(0.0, abs=1e-6)
    assert zero.mean_divergence() is None  # reset: no token since

    experts = Experts(*experts_pair, alpha=2.0)
    recorded: list[Guidance] = []

    class Recording(Guidance):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, record=True)
            recorded.append(self)

    import pipeline.dexperts as dexperts

    original, dexperts.Guidance = dexperts.Guidance, Recording
    try:
        targets, _ = generate_batch(guided, encode_prompts(guided, SOURCES, config), config, seed=3, experts=experts)
    finally:
        dexperts.Guidance = original
    prompts = encode_prompts(guided, SOURCES, config)
    from pipeline.modeling import target_logits

    own = target_logits(guided, prompts, targets, config.k)[0].detach().float()
    steps = torch.stack(recorded[0].steps, dim=1)
    total, tokens = 0.0, 0
    for row, target in enumerate(targets):  # each row's tokens up to and with its eos
        p, q = torch.log_softmax(steps[row, :len(target)], -1), torch.log_softmax(own[row, :len(target)], -1)
        total += float((p.exp() * (p - q)).sum())
        tokens += len(target)
    mean = experts.mean_divergence()
    assert mean > 0 and mean == pytest.approx(total / tokens, rel=1e-3)
