"""The base_model stage: scratch models of both kinds, local Hugging Face checkpoints, refusals, CLI."""

import json
import sys

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from pipeline.artifacts import write_parquet
from pipeline.cli import app
from pipeline.config import BaseModelConfig, section_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.modeling import SPECIAL_TOKENS, format_source, format_target, load_dialog_model
from pipeline.schemas import NORMALIZED
from pipeline.stages import base_model

TINY = dict(vocab_size=300, n_layer=1, d_model=16, n_head=2, ffn_dim=32, max_positions=64)

ROWS = [
    dict(corpus="prosocial_dialog", context=["I'm going to skip my sister's wedding."],
         rots=["It's good to support family."], response="Why? She would be hurt if you missed it.",
         safety_label="__needs_caution__", persona=[], emotion=None, unacceptable_responses=[]),
    dict(corpus="prosocial_dialog", context=["I want to prank my friend.", "What kind of prank?", "Hide his phone."],
         rots=[], response="That could stress him out, maybe pick something harmless.", safety_label="__casual__",
         persona=[], emotion=None, unacceptable_responses=[]),
    dict(corpus="mic", context=["Is it okay to lie to my boss?"], rots=["It's wrong to lie."],
         response="Honesty is best.", safety_label=None, persona=[], emotion=None,
         unacceptable_responses=[{"text": "Sure, lie whenever you like.", "severity": 4}]),
]


def write_normalized(folder, rows=ROWS):
    """A tiny normalized corpus folder: `<folder>/<corpus>/train.parquet`."""
    for corpus in sorted({r["corpus"] for r in rows}):
        mine = [{**r, "split": "train", "dialogue_id": str(i), "turn_index": 1, "derived_split": False}
                for i, r in enumerate(rows) if r["corpus"] == corpus]
        write_parquet(pa.Table.from_pylist(mine * 5, schema=NORMALIZED), folder / corpus / "train.parquet")
    return folder


@pytest.fixture(scope="module")
def normalized(tmp_path_factory):
    return write_normalized(tmp_path_factory.mktemp("normalized"))


def test_training_texts_are_the_formatted_sources_and_targets(normalized):
    texts, read = base_model.training_texts(normalized)
    assert set(read) == {"prosocial_dialog", "mic"} and read["mic"]["rows"] == 5
    # CORPORA order: prosocial_dialog first; per row its source, then its target, then negatives.
    assert texts[:2] == ["<|user|> I'm going to skip my sister's wedding.",
                         "<|rot|> It's good to support family. <|response|> Why? She would be hurt if you missed it."]
    assert format_source(ROWS[1]["context"]) in texts and format_target(ROWS[1]["response"]) in texts
    assert "<|response|> Sure, lie whenever you like." in texts
    assert len(texts) == 5 * (2 + 2) + 5 * 3


@pytest.mark.parametrize("architecture, seq2seq", [("causal", False), ("seq2seq", True)])
def test_scratch_model_round_trips_through_load_dialog_model(normalized, tmp_path, architecture, seq2seq):
    config = BaseModelConfig(kind="scratch", architecture=architecture, **TINY)
    record = base_model.run(config, normalized, tmp_path / "base")
    files = {p.name for p in (tmp_path / "base").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "base_model.json"} <= files
    dm = load_dialog_model(tmp_path / "base")
    assert dm.is_seq2seq is seq2seq
    assert (dm.model.config.d_model if seq2seq else dm.model.config.n_embd) == 16
    assert dm.model.get_input_embeddings().num_embeddings == len(dm.tokenizer) == record["vocab_size"] <= 300
    for token in SPECIAL_TOKENS:
        assert len(dm.tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
        assert dm.tokenizer.convert_tokens_to_ids(token) == record["special_tokens"][token]
    saved = json.loads((tmp_path / "base" / "base_model.json").read_text())
    assert saved["kind"] == "scratch" and saved["architecture"] == architecture
    assert saved["config"]["d_model"] == 16 and "torch" in saved["library_versions"] and "git_commit" in saved
    assert saved["source"]["tokenizer_text"]["mic"]["rows"] == 5


def test_scratch_build_is_deterministic_for_a_seed(normalized, tmp_path):
    paths = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        base_model.run(BaseModelConfig(seed=seed, **TINY), normalized, tmp_path / name)
        paths.append(tmp_path / name)
    read = lambda p, f: (p / f).read_bytes()  # noqa: E731
    assert read(paths[0], "model.safetensors") == read(paths[1], "model.safetensors")
    assert read(paths[0], "tokenizer.json") == read(paths[1], "tokenizer.json")
    assert read(paths[0], "model.safetensors") != read(paths[2], "model.safetensors")


def test_no_training_text_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="normalize stage"):
        base_model.run(BaseModelConfig(**TINY), tmp_path / "empty", tmp_path / "base")


# --- hf: tiny checkpoints saved locally, the way a downloaded one would look -------------------------


def plain_tokenizer(specials: dict):
    """A byte-level BPE tokenizer that knows nothing of the dialog markers (like a hub checkpoint's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=sorted(set(specials.values())), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([r["response"] for r in ROWS] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def save_checkpoint(kind, folder):
    """Save a tiny checkpoint of `kind` (gpt2 without a pad token, bart, or t5 with spare embedding rows)."""
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, T5Config,
                              T5ForConditionalGeneration)

    torch.manual_seed(0)
    if kind == "gpt2":
        tokenizer = plain_tokenizer({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif kind == "bart":
        tokenizer = plain_tokenizer({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                     "unk_token": "<unk>"})
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, **ids))
    else:
        tokenizer = plain_tokenizer({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
        # Like t5-small (32128 rows for 32100 tokens): spare rows that must not be cut away.
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer) + 20, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.parametrize("kind, seq2seq", [("gpt2", False), ("bart", True), ("t5", True)])
def test_hf_checkpoint_gets_the_special_tokens_and_bigger_embeddings(tmp_path, kind, seq2seq):
    source, original, original_tokenizer = save_checkpoint(kind, tmp_path / kind)
    rows_before = original.get_input_embeddings().num_embeddings
    record = base_model.run(BaseModelConfig(kind="hf", name=str(source)), tmp_path / "unused", tmp_path / "base")
    assert record["architecture"] == ("seq2seq" if seq2seq else "causal") and record["model_type"] == kind
    dm = load_dialog_model(tmp_path / "base")  # would raise if a marker, pad or eos were missing
    assert dm.is_seq2seq is seq2seq
    new_tokens = list(SPECIAL_TOKENS) + (["<pad>"] if kind == "gpt2" else [])
    assert sorted(record["added_tokens"]) == sorted(new_tokens)
    assert len(dm.tokenizer) == len(original_tokenizer) + len(new_tokens)
    rows_after = dm.model.get_input_embeddings().num_embeddings
    assert rows_after == (rows_before if kind == "t5" else len(dm.tokenizer))  # t5's spare rows are enough
    assert dm.model.config.pad_token_id == dm.tokenizer.pad_token_id
    # The original embedding rows are kept as they were.
    kept = len(original_tokenizer)
    assert torch.equal(dm.model.get_input_embeddings().weight[:kept], original.get_input_embeddings().weight[:kept])
    for token in SPECIAL_TOKENS:
        ids = dm.tokenizer(f"hi {token} there", add_special_tokens=False)["input_ids"]
        assert dm.tokenizer.convert_tokens_to_ids(token) in ids  # kept whole, not split into pieces


def test_hf_new_rows_are_seeded(tmp_path):
    source, _, _ = save_checkpoint("gpt2", tmp_path / "gpt2")
    weights = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        base_model.run(BaseModelConfig(kind="hf", name=str(source), seed=seed), tmp_path, tmp_path / name)
        weights.append(load_dialog_model(tmp_path / name).model.get_input_embeddings().weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_custom_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    source, _, _ = save_checkpoint("gpt2", tmp_path / "custom")
    (source / "configuration_tiny.py").write_text(
        "from transformers import GPT2Config\n\nclass TinyConfig(GPT2Config):\n    model_type = 'tiny_custom'\n")
    (source / "modeling_tiny.py").write_text(
        "from transformers import GPT2LMHeadModel\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyLM(GPT2LMHeadModel):\n    config_class = TinyConfig\n")
    config_json = json.loads((source / "config.json").read_text())
    config_json.update(model_type="tiny_custom", auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                                                            "AutoModelForCausalLM": "modeling_tiny.TinyLM"})
    (source / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(DataError, match="trust_remote_code"):
        base_model.load_hf(BaseModelConfig(kind="hf", name=str(source)))
    # Opted in, the checkpoint's own classes are used (their module cache kept inside tmp_path).
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model, _, found = base_model.load_hf(BaseModelConfig(kind="hf", name=str(source), trust_remote_code=True))
    assert type(model).__name__ == "TinyLM" and found["model_type"] == "tiny_custom"


def test_unreachable_hub_points_to_a_local_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-model.*local folder"):
        base_model.run(BaseModelConfig(kind="hf", name="no-such-org/no-such-model"), tmp_path, tmp_path / "base")
    with pytest.raises(DataError, match="no such local folder"):
        base_model.load_hf(BaseModelConfig(kind="hf", name=str(tmp_path / "missing")))


def test_not_a_language_model_is_a_data_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    plain_tokenizer({"pad_token": "<pad>", "eos_token": "</s>"}).save_pretrained(tmp_path / "bert")
    with pytest.raises(DataError, match="causal or sequence-to-sequence"):
        base_model.load_hf(BaseModelConfig(kind="hf", name=str(tmp_path / "bert")))


@pytest.mark.parametrize("section, key", [
    ({"kind": "gguf"}, "base_model.kind"),
    ({"architecture": "encoder"}, "base_model.architecture"),
    ({"kind": "hf"}, "base_model.name"),
    ({"d_model": 100, "n_head": 3}, "base_model.d_model"),
    ({"vocab_size": 100}, "base_model.vocab_size"),
    ({"layers": 2}, "base_model.layers"),
])
def test_bad_config_is_a_config_error(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section_from_dict(section, "base_model", BaseModelConfig)


# --- the command ------------------------------------------------------------------------------------


def test_cli_help():
    result = CliRunner().invoke(app, ["base_model", "--help"])
    assert result.exit_code == 0 and "--normalized" in result.output and "--out" in result.output


def test_cli_builds_the_model_and_reports_bad_input(normalized, tmp_path):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": {"kind": "scratch", **TINY}}))
    runner = CliRunner()
    result = runner.invoke(app, ["base_model", "--normalized", str(normalized), "--out", str(tmp_path / "base"),
                                 "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert load_dialog_model(tmp_path / "base").tokenizer.model_max_length == 64
    params.write_text(yaml.safe_dump({"base_model": {"kind": "gguf"}}))
    result = runner.invoke(app, ["base_model", "--normalized", str(normalized), "--out", str(tmp_path / "x"),
                                 "--params", str(params)])
    assert result.exit_code == 2 and "base_model.kind" in result.output
