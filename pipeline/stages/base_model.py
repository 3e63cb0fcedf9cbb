"""base_model: the model every later stage starts from, prepared once so nothing else needs the network.

Reads `params.yaml` section `base_model` and, for `kind: scratch`, the normalized training text
`data/normalized/<corpus>/train.parquet` (and, to pretrain, `validation.parquet`). Writes
`models/base/`: the weights (safetensors), the tokenizer with the dialog markers of
`modeling.SPECIAL_TOKENS`, the model's config.json and `base_model.json` (kind, source, resolved
`base_model` section, sizes, pretraining figures, git commit, library versions).
Later stages load it with `modeling.load_dialog_model`.

    python -m pipeline base_model --normalized data/normalized --out models/base

- `kind: hf` loads a Hugging Face checkpoint (a hub id or a local folder, e.g. `models/pretrained/<name>`
  written by the `pretrained` stage), causal (GPT-2, DialoGPT, Llama-style) or sequence-to-sequence
  (BlenderBot, T5, BART) as its config's `is_encoder_decoder` says. A causal model with a chat template
  is kept as it is and written in its own chat format (`modeling.ChatFormat`; a missing pad becomes its
  eos, nothing is added); any other gets the markers (and a pad or eos token where it has none) and
  grown embeddings (`modeling.MarkerFormat`).
- `kind: scratch` trains a byte-level BPE tokenizer on the training text and builds a small GPT-2
  (`causal`) or BART (`seq2seq`) from the configured sizes, with a seeded initialisation. With
  `pretrain.enabled` it then trains that model with cross-entropy on the (context, reply) pairs of
  the `pretrain.corpora` (the casual ones), formatted and scored exactly as the training stages
  format and score a positive (`pipeline/scoring.py`: `<|response|> reply`, no RoT, no negatives),
  and records the loss and perplexity on their validation pairs before and after in
  `base_model.json` (`pretrain`). Off, nothing of this runs and the saved model is the
  initialisation, byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from pipeline import devices
from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, staged_dir, write_json
from pipeline.config import CORPORA, SPLITS, BaseModelConfig, BaseModelPretrainConfig, TrainConfig
from pipeline.errors import DataError
from pipeline.finetune import fit_pairs
from pipeline.modeling import SPECIAL_TOKENS, DialogModel, check_tokenizer, format_source, format_target
from pipeline.schemas import read_table

log = logging.getLogger(__name__)

PAD, EOS = "<pad>", "</s>"


# --- scratch: tokenizer text and a small model ------------------------------------------------------


def training_texts(normalized: Path) -> tuple[list[str], dict[str, dict]]:
    """Every source and target string of the normalized training splits, in a fixed order.

    Sources and targets are made exactly as training makes them (`format_source`, `format_target`
    with the RoTs), and each known unacceptable reply is added as a target too, since the model
    scores those. Returns the texts and, per corpus read, its row count and the file's SHA-256.
    """
    files = {c: normalized / c / "train.parquet" for c in CORPORA if (normalized / c / "train.parquet").is_file()}
    if not files:
        raise DataError(f"{normalized}: no <corpus>/train.parquet for any of {', '.join(CORPORA)} "
                        "(run the normalize stage first)")
    columns = ["context", "persona", "emotion", "response", "rots", "unacceptable_responses"]
    texts, read = [], {}
    for corpus, path in files.items():
        rows = read_table(path, columns).to_pylist()
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


# --- scratch: pretraining with cross-entropy on the casual corpora -------------------------------

# Columns of a normalized split that make a (source, reply) pair.
PAIR_COLUMNS = ["context", "persona", "emotion", "response"]


def pretraining_pairs(normalized: Path, corpora: list[str], split: str, limit: int, seed: int):
    """The (context, reply) pairs of `split` of every corpus in `corpora`, as a table of groups
    without negatives (`scoring.GROUP_COLUMNS`' row format, the reply the positive, no RoTs), in
    corpus and file order; at most `limit` of them (0: all), a sample drawn with `seed` (kept in
    file order). Returns the table and, per corpus, its row count and file SHA-256."""
    import numpy as np
    import pyarrow as pa

    rows, read = [], {}
    for corpus in corpora:
        path = normalized / corpus / f"{split}.parquet"
        table = read_table(path, PAIR_COLUMNS, missing_hint="base_model.pretrain.corpora lists it; run the "
                                                            "normalize stage first")
        read[corpus] = {"rows": table.num_rows, "sha256": sha256(path)}
        rows += [{"group_id": f"{corpus}/{index}", "context": row["context"], "persona": row["persona"],
                  "emotion": row["emotion"], "positive": row["response"], "rots": [], "negatives": []}
                 for index, row in enumerate(table.to_pylist())]
    if not rows:
        raise DataError(f"{normalized}: the {split} splits of {', '.join(corpora)} have no rows to pretrain on")
    if limit and len(rows) > limit:
        # One stream per split, so the validation sample does not depend on max_examples.
        keep = np.random.default_rng([seed, SPLITS.index(split)]).choice(len(rows), size=limit, replace=False)
        rows = [rows[i] for i in sorted(keep.tolist())]
    return pa.Table.from_pylist(rows), read


def pretrain(model, tokenizer, config: BaseModelPretrainConfig, normalized: Path) -> tuple[dict, dict]:
    """Train `model` in place with cross-entropy on the pretraining pairs of `config.corpora`
    (`finetune.fit_pairs`); returns the record (for base_model.json) and the timing of the optimizer steps."""
    train_table, train_read = pretraining_pairs(normalized, config.corpora, "train", config.max_examples, config.seed)
    validation_table, validation_read = pretraining_pairs(normalized, config.corpora, "validation",
                                                          config.max_validation_examples, config.seed)
    log.info("base_model: pretraining pairs from %s", ", ".join(f"{c} {r['rows']}" for c, r in train_read.items()))
    _, record, timing = fit_pairs(DialogModel(model, tokenizer, bool(model.config.is_encoder_decoder)),
                                  train_table, validation_table, config, "base_model: pretrain", "base_model.pretrain")
    corpora = {c: {"train": train_read[c], "validation": validation_read[c]} for c in config.corpora}
    return {"corpora": corpora, **record}, timing


# --- hf: a pretrained checkpoint --------------------------------------------------------------------


def load_hf(config: BaseModelConfig):
    """Load the checkpoint `config.name` (hub id or local folder) as float32; returns (model, tokenizer,
    source). See `pipeline.checkpoints.load_pretrained` (shared with generate's audited models)."""
    from pipeline.checkpoints import load_pretrained

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


def keep_chat_format(model, tokenizer) -> list[str]:
    """A chat model keeps its vocabulary and is prompted in its own template: nothing is added; a
    missing pad becomes its eos (every mask in this project is explicit, none is read off the pad id).
    Returns the added tokens: none."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer.name_or_path}: a chat model without an eos (end-of-turn) token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for settings in (model.config, model.generation_config):
        settings.pad_token_id = tokenizer.pad_token_id
    return []


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
        if tokenizer.chat_template and not model.config.is_encoder_decoder:
            added = keep_chat_format(model, tokenizer)
        else:
            added = add_dialog_tokens(model, tokenizer, config.seed)
    is_seq2seq = bool(model.config.is_encoder_decoder)
    check_tokenizer(tokenizer, f"base_model ({config.kind})", is_seq2seq)
    pretrained = pretrain(model, tokenizer, config.pretrain, normalized)[0] if config.pretrain.enabled else None
    dialog_format = DialogModel(model, tokenizer, is_seq2seq).format
    record = {
        "kind": config.kind,
        "source": source,
        "config": dataclasses.asdict(config),
        "architecture": "seq2seq" if is_seq2seq else "causal",
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "added_tokens": added,
        "format": dialog_format.name,
        "special_tokens": ({t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
                           if dialog_format.name == "markers" else {}),
        "pretrain": pretrained,
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
