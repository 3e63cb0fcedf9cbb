"""A pretrained chat model through the stages, in its own format (`modeling.ChatFormat`): the base
model keeps its vocabulary, training (LoRA and full) reads and writes the chat template, and sampling,
`chat`, the experts and DExperts read its RoT and reply back. The model is `tests/conftest.py`'s tiny
Llama with a ChatML tokenizer (SmolLM2's architecture and template in miniature)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import (
    BaseModelConfig, DExpertsConfig, DExpertsLoraConfig, GenerateConfig, TrainConfig, TrainLoraConfig, TrainStage1Config,
)
from pipeline.modeling import SPECIAL_TOKENS, ChatFormat, Source, load_dialog_model
from pipeline.sampling import encode_prompts, generate_batch, sample_candidates
from pipeline.stages import base_model
from tests.test_train import assert_same_weights, run_stage, weights, write_groups


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_dm(tiny_chat_model_dir):
    dm = load_dialog_model(tiny_chat_model_dir)
    dm.model.eval()
    return dm


def test_the_base_model_stage_keeps_a_chat_models_vocabulary_and_weights(tmp_path, tiny_chat_model_dir):
    config = BaseModelConfig(kind="hf", name=str(tiny_chat_model_dir))
    record = base_model.run(config, tmp_path / "normalized", tmp_path / "base")
    assert record["format"] == "chat_template" and record["added_tokens"] == [] and record["special_tokens"] == {}
    dm = load_dialog_model(tmp_path / "base")
    assert isinstance(dm.format, ChatFormat)
    assert not set(SPECIAL_TOKENS) & set(dm.tokenizer.get_vocab())
    assert dm.tokenizer.get_vocab() == load_dialog_model(tiny_chat_model_dir).tokenizer.get_vocab()
    assert_same_weights(tmp_path / "base", tiny_chat_model_dir)
    assert json.loads((tmp_path / "base" / "base_model.json").read_text())["format"] == "chat_template"


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_chat_model_trains_with_the_npair_loss_in_its_own_format(tmp_path, tiny_chat_model_dir, lora):
    groups = write_groups(tmp_path / "groups")
    adapters = TrainLoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    config = TrainConfig(batch_groups=4, eval_batch_groups=8, warmup_steps=1, max_source_tokens=96, max_target_tokens=40,
                         lora=adapters)
    out, record = run_stage(tmp_path, tiny_chat_model_dir, groups, config, TrainStage1Config(epochs=1, learning_rate=1e-2),
                            live=False)
    assert math_finite(record["metrics"]["train_last_epoch"]["npair"])
    trained, initial = weights(out), weights(tiny_chat_model_dir)
    assert trained.keys() == initial.keys()  # merged: no adapter tensors, no new embedding rows
    changed = {name for name in initial if not torch.equal(trained[name], initial[name])}
    if lora:
        assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    else:
        assert any("mlp" in n for n in changed)
    assert isinstance(load_dialog_model(out).format, ChatFormat)


def math_finite(value) -> bool:
    return value is not None and np.isfinite(value)


def test_sampling_a_chat_model_stops_at_the_end_of_turn_and_reads_rot_and_reply(chat_dm):
    config = GenerateConfig(k=3, max_new_tokens=12, batch_size=2)
    sources = [Source(["hello there, how are you?"]), Source(["what did you do today?"], ["i love hiking."])]
    prompts = encode_prompts(chat_dm, sources, config)
    assert all(chat_dm.tokenizer.decode(p).endswith("<|im_start|>assistant\n") for p in prompts)
    targets, logps = generate_batch(chat_dm, prompts, config, seed=0)
    eos = chat_dm.tokenizer.eos_token_id
    assert all(eos not in t[:-1] for t in targets) and len(targets) == 6
    sampled = sample_candidates(chat_dm, sources, config, seed=0)
    assert sampled.capped == sum(len(t) == config.max_new_tokens and t[-1] != eos for t in targets)
    for target, text, rot, reply, fluency, lps in zip(targets, sampled.texts, sampled.rots, sampled.responses,
                                                       sampled.fluency, logps):
        reading = chat_dm.format.read(chat_dm.tokenizer, target)
        assert (text, rot, reply) == (reading.text, reading.rot, reading.reply)
        chosen = [lp for lp, keep in zip(lps, reading.reply_mask) if keep]
        assert fluency == (pytest.approx(np.mean(chosen)) if chosen else -np.inf)


def test_the_chat_command_talks_to_a_chat_model(chat_dm, fake_safety_scorer):
    from pipeline.chat import chat_loop

    out = io.StringIO()
    replies = chat_loop(chat_dm, fake_safety_scorer, GenerateConfig(k=2, max_new_tokens=8),
                        io.StringIO("hello there\nhow are you?\n/quit\n"),
                        lambda text="", nl=True: out.write(text + ("\n" if nl else "")))
    assert replies == 2 and out.getvalue().count("bot> ") == 2


def test_experts_and_dexperts_on_a_chat_model(tmp_path, chat_dm, tiny_chat_model_dir):
    from pipeline.dexperts import Experts
    from pipeline.finetune import fit_pairs

    rows = [{"group_id": f"g{i}", "context": ["hello there, how are you?"], "persona": [], "emotion": None,
             "positive": reply, "rots": [], "negatives": []} for i, reply in enumerate(["i am fine.", "good, thanks."] * 4)]
    table = pa.Table.from_pylist(rows)
    config = DExpertsConfig(batch_size=4, epochs=1, learning_rate=1e-2, max_source_tokens=96, max_target_tokens=16,
                            lora=DExpertsLoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    expert = load_dialog_model(tiny_chat_model_dir)
    model, record, _ = fit_pairs(expert, table, table, config, "expert", "dexperts")
    assert record["validation"]["after"]["loss"] < record["validation"]["before"]["loss"]
    assert not hasattr(model, "peft_config")  # merged back into a plain model
    expert.model = model
    antiexpert = load_dialog_model(tiny_chat_model_dir)
    generate = GenerateConfig(k=2, max_new_tokens=6)
    sources = [Source(["hello there, how are you?"])]
    guided = sample_candidates(chat_dm, sources, generate, seed=1, experts=Experts(expert, antiexpert, alpha=0.0))
    plain = sample_candidates(chat_dm, sources, generate, seed=1)
    assert guided.texts == plain.texts  # alpha 0 is the guided model exactly
    steered = sample_candidates(chat_dm, sources, generate, seed=1, experts=Experts(expert, antiexpert, alpha=5.0))
    assert len(steered.texts) == 2


@pytest.mark.parametrize("kind", ["chat_template", "markers"])
def test_sampling_reads_each_prompt_once_and_draws_what_k_repeated_prompts_draw(chat_dm, tiny_dialog_model_dir, kind):
    """generate_batch's shared prompt cache (each prompt read once, its cache repeated k times) gives the
    tokens and log-probabilities of a plain `generate` call on the prompts repeated k times with the same
    settings and sampler, left padding included."""
    from transformers import GenerationConfig, LogitsProcessorList

    from pipeline.modeling import _pad
    from pipeline.sampling import generation_settings, neutral_generation_defaults, pad_id

    dm = chat_dm if kind == "chat_template" else load_dialog_model(tiny_dialog_model_dir)
    dm.model.eval()
    config = GenerateConfig(k=3, max_new_tokens=8)
    sources = [Source(["hi"]), Source(["what did you do today?", "i went hiking."], ["i love hiking."])]
    prompts = encode_prompts(dm, sources, config)
    assert len({len(p) for p in prompts}) == 2
    targets, logps = generate_batch(dm, prompts, config, seed=5)
    ids, attention = _pad(prompts, pad_id(dm.tokenizer), left=True)
    decoding, sampler = generation_settings(dm, config)
    ids, attention = ids.repeat_interleave(config.k, dim=0), attention.repeat_interleave(config.k, dim=0)
    torch.manual_seed(5)
    with torch.no_grad(), neutral_generation_defaults(dm.model):
        plain = dm.model.generate(input_ids=ids, attention_mask=attention, return_dict_in_generate=True,
                                  output_logits=True, generation_config=GenerationConfig(**decoding),
                                  logits_processor=LogitsProcessorList(sampler))
    eos = dm.tokenizer.eos_token_id
    for row, target in enumerate(targets):
        expected = plain.sequences[row, ids.shape[1]:].tolist()
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected
        assert target == expected
        lps = [torch.log_softmax(step[row].float(), -1)[token].item() for step, token in zip(plain.logits, target)]
        assert logps[row] == pytest.approx(lps, abs=1e-4)
