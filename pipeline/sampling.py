"""Sampling candidates from a dialog model: its prompt format, decoding exactly as configured,
batched sampling with each token's log-probability, and reading (RoT, reply) and the reply's
fluency from the generated tokens.

Shared by `generate` (and `audit`), the `chat` command and the stage-1 sampler of `mine`.

Decoding uses `decoding_settings` and nothing else. transformers fills every generation setting a
call leaves unset from the checkpoint's own `generation_config` (BlenderBot's `min_length`,
`no_repeat_ngram_size`, forced bos/eos, ...), so `generate_batch` sets every field that decides the
output and swaps the model's generation config for an empty one during the call. Tokens are drawn by
`Sampler` (temperature, top-k and top-p as transformers applies them, without sorting the whole
vocabulary at every step: `pipeline.nucleus`), `generate` itself running greedy over its choice.

Fluency is the mean log-probability of the reply tokens (`DialogFormat.read`'s `reply_mask`), taken
from the logits `generate` computed while sampling, so it needs no second forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from pipeline.config import GenerateConfig
from pipeline.devices import autocast
from pipeline.errors import DataError
from pipeline.modeling import DialogModel, Source, _pad, cache_keyword, decode_target
from pipeline.nucleus import Nucleus, Sampler

if TYPE_CHECKING:
    from pipeline.dexperts import Experts


# --- prompt formats -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a model's prompt is made from a context, and how its output is read.

    `dialog`: the model's own dialog format (`DialogModel.format`: this project's markers, or a chat
    model's template with the RoT on the assistant turn's first line), whose output is read back as
    (RoT, reply) by that format. The native formats of audited
    models carry the context turns only (a general-purpose model has no slot for a persona or an
    emotion), roles assigned from the end (the last turn is the user's), and their output is read as
    a plain reply with no RoT:
    - `chat_template`: the tokenizer's chat template with user/assistant roles and its generation prompt;
    - `eos_separated`: every turn followed by eos (DialoGPT's format);
    - `separator`: the turns joined by the literal `separator` (COSMO " <turn> ", BlenderBot "  "),
      with the tokenizer's own special tokens; a causal model's prompt also ends with it.
    """

    kind: Literal["dialog", "chat_template", "eos_separated", "separator"]
    separator: str = ""

    @property
    def native(self) -> bool:
        return self.kind != "dialog"

    def describe(self) -> str:
        return f"separator {self.separator!r}" if self.kind == "separator" else self.kind


DIALOG = PromptFormat("dialog")


def resolve_format(setting: str, tokenizer, is_seq2seq: bool, key: str) -> PromptFormat:
    """The native format named by the setting `key` (`audit.models.<name>.format`) for this tokenizer.

    `auto` is the chat template when the tokenizer has one, else `eos_separated` for a causal model;
    a sequence-to-sequence model without a template has no one convention, so it must be named.
    """
    has_template = bool(tokenizer.chat_template)
    if setting == "auto":
        if has_template:
            return PromptFormat("chat_template")
        if is_seq2seq:
            raise DataError(f"{key} = 'auto': the tokenizer has no chat template and a sequence-to-sequence model "
                            "has no default turn separator; set the model's documented one (e.g. '  ' for "
                            "BlenderBot, ' <turn> ' for COSMO) or eos_separated")
        return PromptFormat("eos_separated")
    if setting == "chat_template" and not has_template:
        raise DataError(f"{key} = 'chat_template': the tokenizer has no chat template (use eos_separated or the "
                        "model's turn separator)")
    if setting in ("chat_template", "eos_separated"):
        return PromptFormat(setting)
    return PromptFormat("separator", setting)


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad, else eos (DialoGPT has no pad; the attention mask hides it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def source_budget(dm: DialogModel, config: GenerateConfig) -> int:
    """Prompt tokens that fit: `max_source_tokens`, less what a causal model needs for the token before
    the reply (`<|bot|>`) and the reply within its position limit."""
    budget = config.max_source_tokens
    limit = getattr(dm.model.config, "max_position_embeddings", None)  # None: relative positions (T5)
    if limit and not dm.is_seq2seq:
        budget = min(budget, limit - config.max_new_tokens - 1)
    if budget < 1:
        raise DataError(f"{dm.path}: a context window of {limit} positions leaves no room for a source "
                        f"after generate.max_new_tokens = {config.max_new_tokens}")
    return budget


def native_prompt(dm: DialogModel, turns: Sequence[str], prompt: PromptFormat, max_tokens: int) -> list[int]:
    """The prompt ids of `turns` (oldest first) in a native format, within `max_tokens`: whole oldest
    turns are dropped first; a latest turn that alone is too long keeps the prompt's end."""
    turns = list(turns)
    for start in range(len(turns)):
        ids = _native_ids(dm, turns[start:], prompt)
        if len(ids) <= max_tokens:
            return ids
    return ids[-max_tokens:]


def _native_ids(dm: DialogModel, turns: list[str], prompt: PromptFormat) -> list[int]:
    tokenizer, last = dm.tokenizer, len(turns) - 1
    if prompt.kind == "chat_template":
        messages = [{"role": "user" if (last - i) % 2 == 0 else "assistant", "content": turn}
                    for i, turn in enumerate(turns)]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos
    if prompt.kind == "eos_separated":
        ids = tokenizer(turns, add_special_tokens=False)["input_ids"]
        return [token for row in ids for token in row + [tokenizer.eos_token_id]]
    text = prompt.separator.join(turns) + ("" if dm.is_seq2seq else prompt.separator)
    return tokenizer(text)["input_ids"]


def encode_prompts(dm: DialogModel, sources: Sequence[Source], config: GenerateConfig,
                   prompt: PromptFormat = DIALOG) -> list[list[int]]:
    """The complete prompt ids of each source in `prompt`'s format: what `generate_batch` continues."""
    budget = source_budget(dm, config)
    if prompt.native:
        return [native_prompt(dm, source.context, prompt, budget) for source in sources]
    return dm.format.prompts(dm.tokenizer, sources, budget, dm.is_seq2seq)


# --- decoding -------------------------------------------------------------------------------------


def batch_seed(seed: int, corpus: str, batch_index: int) -> int:
    """The torch seed of one batch: fixed by (seed, corpus, batch index), independent of other batches."""
    digest = hashlib.sha256(f"{seed}:{corpus}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def decoding_settings(dm: DialogModel, config: GenerateConfig) -> dict:
    """Every `GenerationConfig` field that decides which tokens are generated, from `config` and the
    tokenizer only: ancestral sampling (or greedy decoding) with `config`'s temperature, top-p and
    top-k, no beam search, no length, repetition or n-gram constraint, nothing forced or suppressed.

    None is transformers' spelling of "off" (for greedy decoding the sampling fields are unused);
    `generate_batch` keeps the checkpoint's defaults from filling those. Written to stats.json as
    `decoding`.
    """
    tokenizer = dm.tokenizer
    if config.do_sample:
        sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
    else:
        sampling = {"temperature": None, "top_p": None, "top_k": None}
    decoder_start = None
    if dm.is_seq2seq:
        decoder_start = dm.model.config.decoder_start_token_id
        if decoder_start is None:  # an architectural fact some configs keep in generation_config only
            decoder_start = dm.model.generation_config.decoder_start_token_id
        if decoder_start is None:
            raise DataError(f"{dm.path}: a sequence-to-sequence model without a decoder_start_token_id")
    return {
        "max_new_tokens": config.max_new_tokens, "min_length": 0, "min_new_tokens": None,
        "do_sample": config.do_sample, "num_beams": 1, "num_return_sequences": config.k, **sampling,
        "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
        "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
        "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
        "renormalize_logits": False, "remove_invalid_values": False, "guidance_scale": None,
        "stop_strings": None, "max_time": None, "early_stopping": False,
        "pad_token_id": pad_id(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": decoder_start,
    }


def generation_settings(dm: DialogModel, config: GenerateConfig) -> tuple[dict, list]:
    """(the `GenerationConfig` fields, the logits processors) of a `generate` call that decodes as
    `config` says, its inputs holding each prompt k times (`expanded_inputs`): greedy decoding as it is;
    sampling through `Sampler` (`generate` itself greedy over the sampler's choice, its own warpers off)."""
    decoding = {**decoding_settings(dm, config), "num_return_sequences": 1}
    if not config.do_sample:
        return decoding, []
    decoding.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return decoding, [Sampler(Nucleus.of(config))]


def expanded_inputs(dm: DialogModel, input_ids, attention, k: int) -> dict:
    """`generate`'s inputs for k samples of each of S padded prompts (S, L), rows s*k .. s*k+k-1 (the
    order `num_return_sequences` gives): a causal model's prompts read once (`shared_prompt_cache`); a
    sequence-to-sequence model's repeated (its encoder reads each k times: `generate`, run greedy
    for the sampler, takes one sequence per input)."""
    if k == 1:
        return {"input_ids": input_ids, "attention_mask": attention}
    if not dm.is_seq2seq and input_ids.shape[1] > 1:
        return shared_prompt_cache(dm, input_ids, attention, k)
    return {"input_ids": input_ids.repeat_interleave(k, dim=0), "attention_mask": attention.repeat_interleave(k, dim=0)}


@contextlib.contextmanager
def neutral_generation_defaults(model):
    """`model.generation_config` is an empty GenerationConfig inside the block: transformers fills each
    field a call leaves None (forced_eos_token_id, suppress_tokens, ...) from it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def generate_batch(dm: DialogModel, prompts: list[list[int]], config: GenerateConfig, seed: int,
                   logprobs: bool = True, experts: Experts | None = None,
                   ) -> tuple[list[list[int]], list[list[float]] | None]:
    """Sample `config.k` targets for each of S complete prompts in one `generate` call.

    A causal model continues its left-padded prompt (so every row's next token is at the end), each
    prompt read once (`shared_prompt_cache`); a sequence-to-sequence model decodes from the encoded
    prompt. Returns S*k token-id lists grouped by
    prompt, each cut after its first eos (a target that hit `max_new_tokens` has none), and with
    `logprobs` each token's log-probability under the model (its raw logits, before temperature or
    top-p), as many as the target has tokens. Sampling draws through `Sampler` (`generation_settings`).
    With `experts`, each step samples from the DExperts combination (`pipeline.dexperts.Guidance`,
    which applies the sampling filters itself); the log-probabilities stay the guided model's own.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    eos = dm.tokenizer.eos_token_id
    input_ids, attention = _pad(prompts, pad_id(dm.tokenizer), left=not dm.is_seq2seq)  # (S, L)
    device = next(dm.model.parameters()).device
    input_ids, attention = input_ids.to(device), attention.to(device)
    processors = []
    if experts is not None:
        from pipeline.dexperts import Guidance, unfiltered

        processors = [Guidance(experts, config, input_ids, attention)]
        config = unfiltered(config)
    decoding, sampler = generation_settings(dm, config)
    processors = LogitsProcessorList(processors + sampler)
    inputs = expanded_inputs(dm, input_ids, attention, config.k)
    settings = GenerationConfig(**decoding, return_dict_in_generate=True, output_logits=logprobs)
    torch.manual_seed(seed)
    with torch.no_grad(), neutral_generation_defaults(dm.model):
        out = dm.model.generate(**inputs, generation_config=settings, logits_processor=processors or None)
    # Causal output repeats the prompt; seq2seq output starts with the decoder start token.
    new_tokens = out.sequences[:, 1:] if dm.is_seq2seq else out.sequences[:, input_ids.shape[1]:]  # (S*k, T)
    targets = []
    for row in new_tokens.tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        targets.append(row)
    if not logprobs:
        return targets, None
    # One step at a time: log_softmax over the whole (S*k, T, V) at once would hold it twice more.
    steps = [torch.log_softmax(step.float(), dim=-1).gather(-1, new_tokens[:, t: t + 1]).squeeze(-1)
             for t, step in enumerate(out.logits)]  # T x (S*k,)
    token_logps = torch.stack(steps, dim=1).cpu().tolist()  # (S*k, T)
    return targets, [row[: len(target)] for row, target in zip(token_logps, targets)]


def shared_prompt_cache(dm: DialogModel, input_ids, attention, k: int) -> dict:
    """`generate`'s inputs for k samples of each of S left-padded prompts (S, L), each prompt read once:
    one forward pass over all but the prompts' last tokens (positions counted over the real tokens), its
    key/value cache repeated k times, and the prompts repeated k times (rows s*k .. s*k+k-1, the order
    `num_return_sequences` gives); `generate` then reads only the uncached last token. The same tokens as the
    prompts repeated k times for a seed, with the prompts read S rather than S*k times (tested)."""
    import torch

    with torch.no_grad():
        out = dm.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1],
                       position_ids=(attention[:, :-1].cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    cache.batch_repeat_interleave(k)
    return {"input_ids": input_ids.repeat_interleave(k, dim=0), "attention_mask": attention.repeat_interleave(k, dim=0),
            cache_keyword(dm.model): cache}


# --- reading the output ---------------------------------------------------------------------------


def plain_reply(tokenizer, ids: Sequence[int]) -> str:
    """A native-format model's output read as a reply: its text without special tokens, spaces collapsed."""
    return " ".join(tokenizer.decode(list(ids), skip_special_tokens=True).split())


def reply_fluency(token_logps: Sequence[float], mask: Sequence[bool]) -> float:
    """Mean log-probability of the reply tokens; -inf (a per-token probability of 0) for a candidate
    with none, e.g. a RoT that ran to the length limit: it has no reply to be fluent in."""
    chosen = [lp for lp, keep in zip(token_logps, mask) if keep]
    return float(np.mean(chosen)) if chosen else -np.inf


@dataclasses.dataclass
class Sampled:
    """Candidates for S contexts, k each, grouped by context (rows s*k .. s*k+k-1)."""

    texts: list[str]  # S*k generated targets
    rots: list[str | None]
    responses: list[str]
    fluency: np.ndarray  # (S*k,) mean log-probability of the reply tokens
    tokens: int  # generated tokens in all
    capped: int = 0  # candidates that ran to max_new_tokens without ending (no eos)


def sample_candidates(dm: DialogModel, sources: Sequence[Source], config: GenerateConfig, seed: int,
                      prompt: PromptFormat = DIALOG, precision: str = "fp32", experts: Experts | None = None,
                      ) -> Sampled:
    """Sample, decode, parse and fluency-score `config.k` candidates for each source (one batch), the
    model running at `precision` (resolved: fp32, bf16 or fp16), under the DExperts guidance of
    `experts` when given (the fluency stays the guided model's)."""
    tokenizer = dm.tokenizer
    prompts = encode_prompts(dm, sources, config, prompt)
    with autocast(next(dm.model.parameters()).device.type, precision):
        target_ids, token_logps = generate_batch(dm, prompts, config, seed, experts=experts)
    if prompt.native:  # a plain reply, all of it
        texts = [decode_target(tokenizer, ids) for ids in target_ids]
        rots, responses = [None] * len(texts), [plain_reply(tokenizer, ids) for ids in target_ids]
        masks = [[True] * len(ids) for ids in target_ids]
    else:
        readings = [dm.format.read(tokenizer, ids) for ids in target_ids]
        texts, rots, responses = [r.text for r in readings], [r.rot for r in readings], [r.reply for r in readings]
        masks = [r.reply_mask for r in readings]
    fluency = np.array([reply_fluency(logps, mask) for logps, mask in zip(token_logps, masks)], dtype=np.float64)
    eos = tokenizer.eos_token_id
    capped = sum(len(t) == config.max_new_tokens and t[-1] != eos for t in target_ids)
    return Sampled(texts, rots, responses, fluency, sum(len(t) for t in target_ids), capped)
