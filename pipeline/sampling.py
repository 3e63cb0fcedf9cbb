"""Sampling candidates from a dialog model: decoding settings, batched sampling, and turning the
generated tokens into (RoT, reply) with their fluency.

Shared by `generate` (and `audit`), the `chat` command and the stage-1 sampler of `mine`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from pipeline.config import GenerateConfig
from pipeline.errors import DataError
from pipeline.modeling import BOT, EMOTION, PERSONA, USER, DialogModel, Source, _pad, encode_sources, parse_target, token_logprobs

CONTEXT_MARKERS = (USER, BOT, PERSONA, EMOTION)  # a reply that starts a new turn ends there


def source_budget(dm: DialogModel, config: GenerateConfig) -> int:
    """Source tokens that fit: `max_source_tokens`, less what a causal model needs for `<|bot|>` and
    the reply within its position limit."""
    budget = config.max_source_tokens
    limit = getattr(dm.model.config, "max_position_embeddings", None)  # None: relative positions (T5)
    if limit and not dm.is_seq2seq:
        budget = min(budget, limit - config.max_new_tokens - 1)
    if budget < 1:
        raise DataError(f"{dm.path}: a context window of {limit} positions leaves no room for a source "
                        f"after generate.max_new_tokens = {config.max_new_tokens}")
    return budget


def batch_seed(seed: int, corpus: str, batch_index: int) -> int:
    """The torch seed of one batch: fixed by (seed, corpus, batch index), independent of other batches."""
    digest = hashlib.sha256(f"{seed}:{corpus}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generation_config(dm: DialogModel, config: GenerateConfig):
    """Decoding settings from params only (a checkpoint's own defaults, e.g. beam search, are not used)."""
    from transformers import GenerationConfig

    tokenizer = dm.tokenizer
    settings = dict(max_new_tokens=config.max_new_tokens, num_beams=1, num_return_sequences=config.k,
                    do_sample=config.do_sample, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    if dm.is_seq2seq:
        settings["decoder_start_token_id"] = dm.model.config.decoder_start_token_id
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    return GenerationConfig(**settings)


def sample_batch(dm: DialogModel, source_ids: list[list[int]], config: GenerateConfig, seed: int) -> list[list[int]]:
    """Sample `config.k` targets for each source in one `generate` call.

    A causal model continues `source <|bot|>` (left-padded, so every row's next token is at the end);
    a sequence-to-sequence model decodes from the encoded source. Returns S*k token-id lists grouped
    by source, each cut after its first eos (a target that hit `max_new_tokens` has none).
    """
    import torch

    tokenizer = dm.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if dm.is_seq2seq:
        input_ids, attention = _pad(source_ids, pad)  # (S, L)
    else:
        bot = tokenizer.convert_tokens_to_ids(BOT)
        input_ids, attention = _pad([row + [bot] for row in source_ids], pad, left=True)  # (S, L)
    device = next(dm.model.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = dm.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      generation_config=generation_config(dm, config))  # (S*k, L' + T)
    # Causal output repeats the prompt; seq2seq output starts with the decoder start token.
    new_tokens = sequences[:, 1:] if dm.is_seq2seq else sequences[:, input_ids.shape[1]:]
    targets = []
    for row in new_tokens.tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        targets.append(row)
    return targets


def decode_target(tokenizer, ids: Sequence[int]) -> str:
    """The generated text with the RoT/reply markers kept and eos, pad and bos dropped."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def split_candidate(text: str) -> tuple[str | None, str]:
    """(rot, reply) of a generated target; a reply that starts a new turn (`<|user|>`, ...) ends there."""
    cut = min((text.index(m) for m in CONTEXT_MARKERS if m in text), default=len(text))
    return parse_target(text[:cut])


def mean_logprobs(dm: DialogModel, source_ids: list[list[int]], target_ids: list[list[int]], k: int) -> np.ndarray:
    """Length-normalised log-likelihood of each target under `dm`; S sources, S*k targets -> (S*k,)."""
    import torch

    with torch.no_grad():
        logps, mask = token_logprobs(dm, source_ids, target_ids, candidates_per_source=k)  # (S*k, T)
    return (logps.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu().numpy().astype(np.float64)


@dataclasses.dataclass
class Sampled:
    """Candidates for S contexts, k each, grouped by context (rows s*k .. s*k+k-1)."""

    texts: list[str]  # S*k generated targets
    rots: list[str | None]
    responses: list[str]
    fluency: np.ndarray  # (S*k,) mean token log-probability
    tokens: int  # generated tokens in all


def sample_candidates(dm: DialogModel, sources: Sequence[Source], config: GenerateConfig, seed: int) -> Sampled:
    """Sample, decode, parse and fluency-score `config.k` candidates for each source (one batch)."""
    source_ids = encode_sources(dm.tokenizer, sources, source_budget(dm, config))
    target_ids = sample_batch(dm, source_ids, config, seed)
    texts = [decode_target(dm.tokenizer, ids) for ids in target_ids]
    rots, responses = zip(*(split_candidate(t) for t in texts)) if texts else ((), ())
    fluency = mean_logprobs(dm, source_ids, target_ids, config.k)
    return Sampled(texts, list(rots), list(responses), fluency, sum(len(t) for t in target_ids))
