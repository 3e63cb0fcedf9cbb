"""base_model: the model every later stage starts from, prepared once so nothing else needs the network.

Reads `params.yaml` section `base_model` and, for `kind: scratch`, the normalized training text
`data/normalized/<corpus>/train.parquet`. Writes `models/base/`: the weights (safetensors), the
tokenizer with the dialog markers of `modeling.SPECIAL_TOKENS`, the model's config.json and
`base_model.json` (kind, source, resolved `base_model` section, sizes, git commit, library versions).
Later stages load it with `modeling.load_dialog_model`.

    python -m pipeline base_model --normalized data/normalized --out models/base

- `kind: hf` loads a Hugging Face checkpoint (a hub id or a local folder), causal (GPT-2, DialoGPT,
  Llama-style) or sequence-to-sequence (BlenderBot, T5, BART) as its config's `is_encoder_decoder`
  says, adds the markers (and a pad or eos token where it has none) and grows the embeddings.
- `kind: scratch` trains a byte-level BPE tokenizer on the training text and builds a small GPT-2
  (`causal`) or BART (`seq2seq`) from the configured sizes, with a seeded initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, staged_dir, write_json
from pipeline.config import CORPORA, BaseModelConfig
from pipeline.errors import DataError
from pipeline.modeling import SPECIAL_TOKENS, check_tokenizer, format_source, format_target

log = logging.getLogger(__name__)

PAD, EOS = "<pad>", "</s>"


# --- scratch: tokenizer text and a small model ------------------------------------------------------


def training_texts(normalized: Path) -> tuple[list[str], dict[str, dict]]:
    """Every source and target string of the normalized training splits, in a fixed order.

    Sources and targets are made exactly as training makes them (`format_source`, `format_target`
    with the RoTs), and each known unacceptable reply is added as a target too, since the model
    scores those. Returns the texts and, per corpus read, its row count and the file's SHA-256.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {c: normalized / c / "train.parquet" for c in CORPORA if (normalized / c / "train.parquet").is_file()}
    if not files:
        raise DataError(f"{normalized}: no <corpus>/train.parquet for any of {', '.join(CORPORA)} "
                        "(run the normalize stage first)")
    columns = ["context", "persona", "emotion", "response", "rots", "unacceptable_responses"]
    texts, read = [], {}
    for corpus, path in files.items():
        try:
            rows = pq.read_table(path, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a normalized split with columns {', '.join(columns)} ({error})") from None
        for row in rows:
            texts.append(format_source(row["context"], row["persona"] or (), row["emotion"]))
            texts.append(format_target(row["response"], row["rots"] or ()))
            texts.extend(format_target(n["text"]) for n in row["unacceptable_responses"] or ())
        read[corpus] = {"rows": len(rows), "sha256": sha256(path)}
    return texts, read


def build_scratch(config: BaseModelConfig, texts: list[str]):
    """A tokenizer trained on `texts` and a freshly initialised model of `config.architecture`."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    from pipeline.modeling import train_tokenizer

    tokenizer = train_tokenizer(texts, config.vocab_size)
    tokenizer.model_max_length = config.max_positions
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(config.seed)
    if config.architecture == "causal":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_embd=config.d_model, n_layer=config.n_layer, n_head=config.n_head,
            n_inner=config.ffn_dim, n_positions=config.max_positions, **ids))
    else:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tokenizer), d_model=config.d_model, encoder_layers=config.n_layer,
            decoder_layers=config.n_layer, encoder_attention_heads=config.n_head,
            decoder_attention_heads=config.n_head, encoder_ffn_dim=config.ffn_dim, decoder_ffn_dim=config.ffn_dim,
            max_position_embeddings=config.max_positions, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id, **ids))
    return model, tokenizer


# --- hf: a pretrained checkpoint --------------------------------------------------------------------


def load_hf(config: BaseModelConfig):
    """Load the checkpoint `config.name` (hub id or local folder) as float32; returns (model, tokenizer,
    source). See `pipeline.pretrained.load_pretrained` (shared with generate's audited models)."""
    from pipeline.pretrained import load_pretrained

    return load_pretrained(config.name, config.revision, config.trust_remote_code, "base_model.name",
                           "base_model.trust_remote_code")


def add_dialog_tokens(model, tokenizer, seed: int) -> list[str]:
    """Add the dialog markers (and pad / eos where missing) to `tokenizer`, grow `model`'s embeddings.

    New embedding rows are drawn around the old rows' mean (transformers' mean resizing), seeded.
    The embedding matrix is only ever grown: a model with spare rows (T5) keeps its size. Returns
    the tokens that were new to the vocabulary.
    """
    import torch

    vocab = tokenizer.get_vocab()
    special: dict = {"extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in vocab]}
    if tokenizer.eos_token_id is None:
        special["eos_token"] = EOS
    if tokenizer.pad_token_id is None:
        # A pad of its own rather than eos, so nothing that masks by pad id ever hides the real eos.
        special["pad_token"] = PAD
    tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    added = [t for t in tokenizer.get_vocab() if t not in vocab]
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tokenizer))
    for settings in (model.config, model.generation_config):
        settings.pad_token_id = tokenizer.pad_token_id
        if settings.eos_token_id is None:  # an existing eos (a list for some chat models) is kept
            settings.eos_token_id = tokenizer.eos_token_id
    return sorted(added, key=tokenizer.convert_tokens_to_ids)


# --- run --------------------------------------------------------------------------------------------


def run(config: BaseModelConfig, normalized: Path, out: Path) -> dict:
    """Prepare the base model of `config` and write it to `out`; returns the provenance record."""
    ensure_writable(out)
    started = time.perf_counter()
    if config.kind == "scratch":
        texts, read = training_texts(normalized)
        log.info("base_model: training a %d-token BPE tokenizer on %d texts from %s",
                 config.vocab_size, len(texts), ", ".join(f"{c} ({r['rows']} rows)" for c, r in read.items()))
        model, tokenizer = build_scratch(config, texts)
        added = []
        source = {"tokenizer_text": read, "texts": len(texts)}
    else:
        log.info("base_model: loading %s", config.name)
        model, tokenizer, source = load_hf(config)
        added = add_dialog_tokens(model, tokenizer, config.seed)
    check_tokenizer(tokenizer, f"base_model ({config.kind})")
    is_seq2seq = bool(model.config.is_encoder_decoder)
    record = {
        "kind": config.kind,
        "source": source,
        "config": dataclasses.asdict(config),
        "architecture": "seq2seq" if is_seq2seq else "causal",
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "added_tokens": added,
        "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "git_commit": git_commit(),
        "library_versions": library_versions(),
    }
    with staged_dir(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(record, folder / "base_model.json")
    log.info("base_model: %s %s, %.2fM parameters, vocabulary %d -> %s (%.1f s)", record["architecture"],
             record["model_type"], record["parameters"] / 1e6, record["vocab_size"], out,
             time.perf_counter() - started)
    return record
