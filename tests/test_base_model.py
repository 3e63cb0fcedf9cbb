"""The base_model stage: scratch models of both kinds, pretraining on casual pairs, local Hugging Face
checkpoints, refusals, CLI."""

import json
import math
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.artifacts import write_parquet
from pipeline.cli import app
from pipeline.config import BaseModelConfig, BaseModelPretrainConfig, section_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.finetune import pair_settings
from pipeline.modeling import BOT, SPECIAL_TOKENS, DialogModel, format_source, format_target, load_dialog_model
from pipeline.schemas import NORMALIZED
from pipeline.scoring import encode_groups
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


# --- pretraining on casual (context, reply) pairs --------------------------------------------------

NAMES, FOODS = ("anna", "ben", "carl", "dora"), ("pizza", "pasta", "soup", "salad")


def casual_rows(corpus: str, split: str, n: int, offset: int = 0) -> list[dict]:
    """`n` rows of one pattern a tiny model learns in a few steps ("i want <food>, <name>.")."""
    persona = ["i like cooking."] if corpus == "persona_chat" else []
    return [dict(corpus=corpus, split=split, dialogue_id=f"{split}-{i}", turn_index=1, derived_split=False,
                 context=[f"hi {NAMES[(i + offset) % 4]}, what do you want to eat?"],
                 response=f"i want {FOODS[(i + offset) // 4 % 4]}, {NAMES[(i + offset) % 4]}.", rots=[],
                 safety_label=None, persona=persona, emotion=None, unacceptable_responses=[])
            for i in range(n)]


@pytest.fixture(scope="module")
def casual(tmp_path_factory):
    """daily_dialog (24 train, 8 validation pairs) and persona_chat (16, 8; a persona on every row)."""
    folder = tmp_path_factory.mktemp("casual")
    for corpus, sizes in (("daily_dialog", (24, 8)), ("persona_chat", (16, 8))):
        for split, n in zip(("train", "validation"), sizes):
            rows = casual_rows(corpus, split, n, offset=0 if split == "train" else 3)
            write_parquet(pa.Table.from_pylist(rows, schema=NORMALIZED), folder / corpus / f"{split}.parquet")
    return folder


SMALL = dict(TINY, max_positions=128)
PRETRAIN = dict(enabled=True, corpora=["daily_dialog", "persona_chat"], epochs=2, batch_size=8, learning_rate=1e-2)


def pretrained(folder, out, seed=0, architecture="causal", **pretrain) -> dict:
    config = BaseModelConfig(architecture=architecture, **SMALL,
                             pretrain=BaseModelPretrainConfig(**{**PRETRAIN, "seed": seed, **pretrain}))
    return base_model.run(config, folder, out)


def independent_perplexity(folder, normalized) -> float:
    """Perplexity of the validation replies (`<|response|> reply</s>`) given their sources, by the
    Hugging Face model's own label-masked loss, one pair at a time (no code of pipeline/scoring.py)."""
    dm = load_dialog_model(folder)
    nll, tokens = 0.0, 0
    for corpus in ("daily_dialog", "persona_chat"):
        for row in pq.read_table(normalized / corpus / "validation.parquet").to_pylist():
            source = dm.tokenizer(format_source(row["context"], row["persona"]), add_special_tokens=False)["input_ids"]
            target = dm.tokenizer(format_target(row["response"]), add_special_tokens=False)["input_ids"]
            target = target + [dm.tokenizer.eos_token_id]
            with torch.no_grad():
                if dm.is_seq2seq:
                    loss = dm.model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).loss
                else:
                    prefix = source + [dm.tokenizer.convert_tokens_to_ids(BOT)]
                    loss = dm.model(input_ids=torch.tensor([prefix + target]),
                                    labels=torch.tensor([[-100] * len(prefix) + target])).loss
            nll, tokens = nll + float(loss) * len(target), tokens + len(target)
    return float(torch.tensor(nll / tokens).exp())


def test_pretraining_off_saves_the_initialisation_byte_for_byte(casual, tmp_path):
    """Off (whatever else the pretrain section says), run() saves exactly what build_scratch makes and
    reads no validation split; the same folder without validation splits still builds."""
    from transformers import GPT2LMHeadModel

    texts, _ = base_model.training_texts(casual)
    model, tokenizer = base_model.build_scratch(BaseModelConfig(**SMALL), texts)
    assert type(model) is GPT2LMHeadModel
    model.save_pretrained(tmp_path / "built")
    tokenizer.save_pretrained(tmp_path / "built")
    no_validation = tmp_path / "train_only"
    for corpus in ("daily_dialog", "persona_chat"):
        (no_validation / corpus).mkdir(parents=True)
        (no_validation / corpus / "train.parquet").write_bytes((casual / corpus / "train.parquet").read_bytes())
    off = BaseModelPretrainConfig(**{**PRETRAIN, "enabled": False, "epochs": 5})
    record = base_model.run(BaseModelConfig(**SMALL, pretrain=off), no_validation, tmp_path / "off")
    assert record["pretrain"] is None
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "off" / name).read_bytes() == (tmp_path / "built" / name).read_bytes()


@pytest.mark.parametrize("architecture", ["causal", "seq2seq"])
def test_pretraining_lowers_validation_perplexity(casual, tmp_path, architecture):
    untrained = base_model.run(BaseModelConfig(architecture=architecture, **SMALL), casual, tmp_path / "untrained")
    record = pretrained(casual, tmp_path / "pretrained", architecture=architecture)
    facts = record["pretrain"]
    assert facts["pairs"] == {"train": 40, "validation": 16} and facts["steps"] == 2 * 5
    assert facts["corpora"]["persona_chat"]["validation"]["rows"] == 8
    assert [h["epoch"] for h in facts["history"]] == [0, 1, 2]
    before, after = facts["validation"]["before"], facts["validation"]["after"]
    # The recorded figures are the saved models' own, by an independent computation.
    assert before["perplexity"] == pytest.approx(independent_perplexity(tmp_path / "untrained", casual), rel=1e-4)
    assert after["perplexity"] == pytest.approx(independent_perplexity(tmp_path / "pretrained", casual), rel=1e-4)
    assert after["perplexity"] < 0.5 * before["perplexity"]
    assert after["loss"] == pytest.approx(math.log(after["perplexity"]))
    assert untrained["vocab_size"] == record["vocab_size"]  # the same tokenizer: the perplexities compare
    saved = json.loads((tmp_path / "pretrained" / "base_model.json").read_text())
    assert saved["pretrain"]["validation"]["after"]["perplexity"] == pytest.approx(after["perplexity"])
    assert saved["config"]["pretrain"]["enabled"] is True


def test_pretraining_is_deterministic_for_a_seed(casual, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pretrained(casual, tmp_path / name, seed=seed, epochs=1)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]
    records = [json.loads((tmp_path / name / "base_model.json").read_text())["pretrain"] for name in "ab"]
    assert records[0] == records[1]


def test_pretraining_pairs_are_formatted_as_training_formats_them(casual):
    table, read = base_model.pretraining_pairs(casual, ["persona_chat", "daily_dialog"], "train", 0, seed=0)
    assert table.num_rows == 40 and list(read) == ["persona_chat", "daily_dialog"]
    first = table.to_pylist()[0]
    assert first["positive"] == "i want pizza, anna." and first["rots"] == [] and first["negatives"] == []
    texts, _ = base_model.training_texts(casual)
    tokenizer = base_model.build_scratch(BaseModelConfig(**SMALL), texts)[1]
    settings = pair_settings(BaseModelPretrainConfig(max_source_tokens=64, max_target_tokens=48))
    encoded = encode_groups(DialogModel(None, tokenizer, False), table.slice(0, 1), settings)
    assert encoded.negatives == 0
    assert (tokenizer.decode(encoded.prompt_ids[0])
            == "<|persona|> i like cooking. <|user|> hi anna, what do you want to eat?<|bot|>")
    assert tokenizer.decode(encoded.target_ids[0][0]) == "<|response|> i want pizza, anna.</s>"
    # A seeded sample, in file order; another limit leaves the validation sample as it was.
    sample = base_model.pretraining_pairs(casual, ["daily_dialog", "persona_chat"], "train", 10, seed=3)[0]
    assert sample.num_rows == 10 and sample == base_model.pretraining_pairs(
        casual, ["daily_dialog", "persona_chat"], "train", 10, seed=3)[0]
    ids = sample["group_id"].to_pylist()
    order = {g: i for i, g in enumerate(base_model.pretraining_pairs(
        casual, ["daily_dialog", "persona_chat"], "train", 0, seed=3)[0]["group_id"].to_pylist())}
    assert ids == sorted(ids, key=order.__getitem__)
    assert ids != base_model.pretraining_pairs(casual, ["daily_dialog", "persona_chat"], "train", 10,
                                               seed=4)[0]["group_id"].to_pylist()


def test_a_pretraining_corpus_without_its_split_is_a_data_error(casual, tmp_path):
    with pytest.raises(DataError, match=r"empathetic_dialogues/train\.parquet: file not found.*normalize"):
        pretrained(casual, tmp_path / "base", corpora=["daily_dialog", "empathetic_dialogues"])
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("section, key", [
    ({"kind": "hf", "name": "x", "pretrain": {"enabled": True}}, "base_model.pretrain.enabled"),
    ({"pretrain": {"enabled": True, "corpora": ["reddit"]}}, "base_model.pretrain.corpora"),
    ({"pretrain": {"corpora": ["daily_dialog", "prosocial_dialog"]}}, "base_model.pretrain.corpora"),  # not casual
    ({"pretrain": {"enabled": True, "max_source_tokens": 400, "max_target_tokens": 200}},
     "base_model.pretrain.max_source_tokens"),
    ({"pretrain": {"epoch": 2}}, "base_model.pretrain.epoch"),
    ({"pretrain": {"batch_size": 0}}, "base_model.pretrain.batch_size"),
])
def test_bad_pretrain_config_is_a_config_error(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section_from_dict(section, "base_model", BaseModelConfig)


def test_the_longest_pretraining_input_must_fit_the_positions():
    fits = dict(enabled=True, max_source_tokens=400, max_target_tokens=111)
    BaseModelConfig(pretrain=BaseModelPretrainConfig(**fits))  # 400 + 1 + 111 = 512 positions
    with pytest.raises(ConfigError, match="512"):
        BaseModelConfig(pretrain=BaseModelPretrainConfig(**{**fits, "max_target_tokens": 112}))
    BaseModelConfig(architecture="seq2seq", pretrain=BaseModelPretrainConfig(**{**fits, "max_source_tokens": 512}))


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
