"""The dialog model's text format, loading, and batched sequence scoring — shared by training,
mining, generation and evaluation.

Format (Prost-style; the special tokens are added to every tokenizer by the `base_model` stage):

    source: <|persona|> i love hiking. <|emotion|> proud <|user|> hi! <|bot|> hello. <|user|> guess what?
    target: <|rot|> It's good to celebrate others. <|response|> Tell me!

The target is the RoT followed by the reply when the example has RoTs (and `rot_target` is on),
else `<|response|> reply`. Context turns alternate speakers and the last one is always the user's,
so markers are assigned from the end. A causal model sees `source <|bot|> target</s>` and is scored
on the target only; a sequence-to-sequence model encodes the source and decodes the target.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

from pipeline.errors import DataError

if TYPE_CHECKING:
    import torch

USER, BOT = "<|user|>", "<|bot|>"
PERSONA, EMOTION = "<|persona|>", "<|emotion|>"
ROT, RESPONSE = "<|rot|>", "<|response|>"
SPECIAL_TOKENS = (USER, BOT, PERSONA, EMOTION, ROT, RESPONSE)


# --- text format ----------------------------------------------------------------------------------


def format_source(context: Sequence[str], persona: Sequence[str] = (), emotion: str | None = None) -> str:
    """The conditioning text: persona and emotion prefixes, then the turns with speaker markers."""
    parts = []
    if len(persona):
        parts.append(f"{PERSONA} {' '.join(persona)}")
    if emotion:
        parts.append(f"{EMOTION} {emotion}")
    last = len(context) - 1
    for index, turn in enumerate(context):
        parts.append(f"{USER if (last - index) % 2 == 0 else BOT} {turn}")
    return " ".join(parts)


def format_target(response: str, rots: Sequence[str] = (), rot_target: bool = True) -> str:
    """The text the model learns to write: `<|rot|> RoT <|response|> reply`, or the reply alone."""
    if rot_target and len(rots):
        return f"{ROT} {' '.join(rots)} {RESPONSE} {response}"
    return f"{RESPONSE} {response}"


def parse_target(text: str) -> tuple[str | None, str]:
    """Split a generated target into (rot, response).

    The RoT is the text between `<|rot|>` and `<|response|>` (None when there is no `<|rot|>`, or it
    is empty); the reply is what follows the last `<|response|>`. A RoT that ran to the length limit
    without a `<|response|>` gives (rot, ""). Text with neither marker is taken as the reply.
    """
    text = text.strip()
    rot = None
    if ROT in text:
        before, _, text = text.partition(ROT)
        rot_text, marker, text = text.partition(RESPONSE)
        rot = rot_text.strip() or None
        if not marker:
            return rot, ""
    elif RESPONSE in text:
        _, _, text = text.partition(RESPONSE)
    if RESPONSE in text:
        text = text.rpartition(RESPONSE)[2]
    return rot, " ".join(text.replace(ROT, " ").split())


# --- loading --------------------------------------------------------------------------------------


@dataclass
class DialogModel:
    """A loaded model with its tokenizer; `is_seq2seq` selects how sources and targets are fed."""

    model: object
    tokenizer: object
    is_seq2seq: bool
    path: Path | None = None


def check_tokenizer(tokenizer, where: str) -> None:
    """The tokenizer must know every special token as a single token, and have pad and eos."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{where}: tokenizer lacks the special tokens {', '.join(missing)} "
                        "(models must be prepared by the base_model stage)")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise DataError(f"{where}: tokenizer has no pad or eos token")


def load_dialog_model(path: str | Path, device: str = "cpu") -> DialogModel:
    """Load a model folder in save_pretrained format (safetensors only, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise DataError(f"{path}: no .safetensors weights (only safetensors are loaded)")
    if not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: model folder has no tokenizer (tokenizer_config.json)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        check_tokenizer(tokenizer, str(path))
        loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = loader.from_pretrained(path, use_safetensors=True, trust_remote_code=False).to(device)
    except (ValueError, OSError, KeyError) as error:  # unknown model type, unreadable config or weights
        raise DataError(f"{path}: cannot load the model ({str(error).strip().splitlines()[0]})") from None
    return DialogModel(model, tokenizer, bool(config.is_encoder_decoder), path)


# --- batching and scoring -------------------------------------------------------------------------


class Source(NamedTuple):
    """What conditions a reply: the previous turns (oldest first, the user's last), and the replying
    speaker's persona sentences and the conversation's emotion where the corpus has them."""

    context: Sequence[str]
    persona: Sequence[str] = ()
    emotion: str | None = None

    @property
    def text(self) -> str:
        return format_source(self.context, self.persona, self.emotion)


def encode_sources(tokenizer, sources: Sequence[Source], max_tokens: int) -> list[list[int]]:
    """Token ids of each source within `max_tokens`, cut by whole turns, oldest first.

    The persona/emotion prefix and the latest turns are what the reply depends on, so a source that
    is too long loses its oldest turns first; the prefix is kept (cut from its end to at most half
    the budget when it alone is that long), and a latest turn that still does not fit keeps its
    marker and its last tokens.
    """
    ids = tokenizer([s.text for s in sources], add_special_tokens=False)["input_ids"]
    out = []
    for source, row in zip(sources, ids):
        if len(row) <= max_tokens:
            out.append(row)
            continue
        context = list(source.context)
        while len(context) > 1:
            context = context[1:]
            # Markers are assigned from the end, so dropping the oldest turn keeps every speaker's.
            row = tokenizer(format_source(context, source.persona, source.emotion), add_special_tokens=False)["input_ids"]
            if len(row) <= max_tokens:
                break
        if len(row) > max_tokens:
            prefix = tokenizer(format_source([], source.persona, source.emotion),
                               add_special_tokens=False)["input_ids"][: max_tokens // 2]
            marker = tokenizer(USER, add_special_tokens=False)["input_ids"]
            last = tokenizer(f" {context[-1]}" if context else "", add_special_tokens=False)["input_ids"]
            keep = max(max_tokens - len(prefix) - len(marker), 0)
            row = (prefix + marker + last[len(last) - keep:])[-max_tokens:]
        out.append(row)
    return out


def encode_targets(tokenizer, targets: Sequence[str], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each target within `max_tokens`, and whether it was cut.

    A target that fits ends in eos. One that does not keeps its first `max_tokens` tokens and no
    eos: an eos after a cut would teach the model to stop mid-sentence, and would weigh an
    unlikely end-of-reply in a cut candidate's score.
    """
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    cut = [len(row) >= max_tokens for row in ids]
    return [row[:max_tokens] if was_cut else row + [tokenizer.eos_token_id] for row, was_cut in zip(ids, cut)], cut


def _pad(rows: list[list[int]], value: int, left: bool = False):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        else:
            out[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return out, mask


def token_logprobs(dm: DialogModel, source_ids: list[list[int]], target_ids: list[list[int]],
                   candidates_per_source: int = 1) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Log-probability of every target token given its source, in one batched forward pass.

    `source_ids` has S rows; `target_ids` has S * C rows, C = `candidates_per_source`, grouped by
    source (rows s*C .. s*C+C-1 belong to source s). Each source is read once and shared across its C
    candidates: a sequence-to-sequence model encodes it once; a causal model reads `source <|bot|> target`,
    and with C > 1 reads the source once and its C targets from the source's key/value cache.
    Returns `logps` (S*C, T) and `mask` (S*C, T) with 1 on real target tokens, 0 on padding.
    """
    logits, labels, target_mask = target_logits(dm, source_ids, target_ids, candidates_per_source)
    return logprobs_of(logits, labels, target_mask)


def logprobs_of(logits: "torch.Tensor", labels: "torch.Tensor", target_mask: "torch.Tensor"):
    """Each label's log-probability under `logits` (S*C, T, V), zero where `target_mask` is 0; and the mask."""
    import torch

    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (S*C, T)
    return logps * target_mask, target_mask


def target_logits(dm: DialogModel, source_ids: list[list[int]], target_ids: list[list[int]],
                  candidates_per_source: int = 1) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The logits that predict every target token (S*C, T, V), the target tokens (S*C, T) and their mask,
    as `token_logprobs` reads them (same arguments)."""
    import torch

    model, tokenizer = dm.model, dm.tokenizer
    pad = tokenizer.pad_token_id
    C = candidates_per_source
    if dm.is_seq2seq:
        enc_ids, enc_mask = _pad(source_ids, pad)  # (S, L)
        labels, target_mask = _pad(target_ids, pad)  # (S*C, T)
        device = next(model.parameters()).device
        encoder_out = model.get_encoder()(input_ids=enc_ids.to(device), attention_mask=enc_mask.to(device))
        hidden = encoder_out.last_hidden_state.repeat_interleave(C, dim=0)  # (S*C, L, H)
        start = model.config.decoder_start_token_id
        start = pad if start is None else start
        decoder_in = torch.cat([torch.full((labels.shape[0], 1), start), labels[:, :-1]], dim=1)  # (S*C, T)
        out = model(encoder_outputs=(hidden,), attention_mask=enc_mask.repeat_interleave(C, dim=0).to(device),
                    decoder_input_ids=decoder_in.to(device), decoder_attention_mask=target_mask.to(device))
        logits = out.logits  # (S*C, T, V)
        labels, target_mask = labels.to(device), target_mask.to(device)
    elif C > 1:
        return _shared_source_logits(dm, source_ids, target_ids, C)
    else:
        bot = tokenizer.convert_tokens_to_ids(BOT)
        rows, starts = [], []
        for index, target in enumerate(target_ids):
            prefix = source_ids[index // C] + [bot]
            rows.append(prefix + target)
            starts.append(len(prefix))
        ids, attention = _pad(rows, pad)  # (S*C, L+T), right-padded
        device = next(model.parameters()).device
        logits_all = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (S*C, L+T, V)
        width = max(len(t) for t in target_ids)
        # Gather each row's target positions: token j of the target is predicted at position start+j-1.
        positions = torch.tensor(starts).unsqueeze(1) - 1 + torch.arange(width).unsqueeze(0)  # (S*C, T)
        target_mask = torch.zeros_like(positions)
        labels = torch.full_like(positions, pad)
        for i, target in enumerate(target_ids):
            target_mask[i, : len(target)] = 1
            labels[i, : len(target)] = torch.tensor(target)
        positions = positions.clamp(max=ids.shape[1] - 1).to(device)
        logits = logits_all.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits_all.shape[-1]))
        labels, target_mask = labels.to(device), target_mask.to(device)
    return logits, labels, target_mask


def cache_keyword(model) -> str:
    """The keyword `model`'s forward takes its key/value cache by: `cache` from transformers 5.2x on,
    `past_key_values` before; a peft wrapper's is its base model's. Looked up once per model class (the
    scorer asks at every training step)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _class_cache_keyword(type(base))


@functools.cache
def _class_cache_keyword(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _shared_source_logits(dm: DialogModel, source_ids: list[list[int]], target_ids: list[list[int]], C: int):
    """`target_logits` of a causal model whose sources each have C > 1 targets: the left-padded sources in
    one forward pass, their key/value cache repeated C times, then `<|bot|> target` (the last token
    dropped: nothing is predicted after it) read from that cache at the positions the sources end at.
    The same logits as reading `source <|bot|> target` whole, up to float rounding, with the source read
    once rather than C times and the output layer applied to the target positions only (tested)."""
    import torch

    model, tokenizer = dm.model, dm.tokenizer
    pad, bot = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(BOT)
    device = next(model.parameters()).device
    source, source_mask = (t.to(device) for t in _pad(source_ids, pad, left=True))  # (S, L)
    cache_name = cache_keyword(model)
    out = model(input_ids=source, attention_mask=source_mask, position_ids=(source_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    cache.batch_repeat_interleave(C)
    labels, target_mask = (t.to(device) for t in _pad(target_ids, pad))  # (S*C, T)
    inputs = torch.cat([torch.full_like(labels[:, :1], bot), labels[:, :-1]], dim=1)  # (S*C, T)
    ends = source_mask.sum(-1).repeat_interleave(C).unsqueeze(1)  # (S*C, 1): where `<|bot|>` goes
    positions = ends + torch.arange(labels.shape[1], device=device).unsqueeze(0)
    attention = torch.cat([source_mask.repeat_interleave(C, dim=0), torch.ones_like(target_mask)], dim=1)
    logits = model(input_ids=inputs, attention_mask=attention, position_ids=positions, use_cache=True,
                   **{cache_name: cache}).logits  # (S*C, T, V)
    return logits, labels, target_mask


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with pad/bos/eos/unk and the dialog markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    basic = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=basic + list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return fast
