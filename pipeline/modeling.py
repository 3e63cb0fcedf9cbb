"""The dialog model's text format, loading, and batched sequence scoring — shared by training,
mining, generation and evaluation.

A model is read and written in one of two formats (`DialogModel.format`, chosen by its tokenizer),
and every stage goes through that one object: training, scoring, sampling, fluency, `chat`, DExperts.

`MarkerFormat` (Prost-style; the markers are added to the tokenizer by the `base_model` stage; scratch
models and pretrained models without a chat template):

    prompt: <|persona|> i love hiking. <|emotion|> proud <|user|> hi! <|bot|> hello. <|user|> guess what? <|bot|>
    target: <|rot|> It's good to celebrate others. <|response|> Tell me!</s>

`ChatFormat` (a pretrained causal chat model, prompted the way it was trained, nothing added to its
vocabulary): the context goes through the tokenizer's own chat template, persona and emotion as a
system turn, ending in the template's generation prompt; the target is the assistant turn in plain
text, the RoT on its first line, ended by the template's end-of-turn token (the tokenizer's eos):

    prompt: <|im_start|>system\nYour persona: i love hiking. ...<|im_end|>\n<|im_start|>user\nhi!<|im_end|>\n
            ...<|im_start|>assistant\n
    target: Rule of thumb: It's good to celebrate others.\nTell me!<|im_end|>

In both, the RoT comes first when the example has RoTs (and `rot_target` is on); context turns
alternate speakers and the last one is always the user's, so roles are assigned from the end. A causal
model reads `prompt target` and is scored on the target only (the prompt's last token is the one the
target's first token follows); a sequence-to-sequence model encodes the prompt and decodes the target.
A candidate's score covers its reply's tokens (and eos), not the RoT or the marker before the reply.
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
CONTEXT_MARKERS = (USER, BOT, PERSONA, EMOTION)  # a generated reply that starts a new turn ends there
RULE_OF_THUMB = "Rule of thumb:"  # ChatFormat: the first line of a target with a RoT starts with it


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
    """A loaded model with its tokenizer; `is_seq2seq` selects how prompts and targets are fed, and
    `format` (from the tokenizer, `dialog_format`) how they are written and read back."""

    model: object
    tokenizer: object
    is_seq2seq: bool
    path: Path | None = None

    @functools.cached_property
    def format(self) -> DialogFormat:
        return dialog_format(self.tokenizer, self.is_seq2seq, str(self.path or "model"))


def check_tokenizer(tokenizer, where: str, is_seq2seq: bool = False) -> None:
    """The tokenizer must have pad and eos and a dialog format: every marker as a single token, or (a
    causal model) a chat template."""
    dialog_format(tokenizer, is_seq2seq, where)
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
        check_tokenizer(tokenizer, str(path), bool(config.is_encoder_decoder))
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


# --- the two formats ------------------------------------------------------------------------------


class EncodedTargets(NamedTuple):
    """Token ids of targets, where each one's reply starts, and whether it was cut (no eos)."""

    ids: list[list[int]]
    reply_starts: list[int]  # the first reply token; len(ids) when the RoT filled the whole budget
    cut: list[bool]


class Reading(NamedTuple):
    """A generated target read back: its text, its RoT (None when it has none), its reply, and which
    of its tokens the reply was read from (the tokens its fluency averages; eos counts when the reply
    ended there)."""

    text: str
    rot: str | None
    reply: str
    reply_mask: list[bool]


def _cut_targets(heads: list[list[int]], replies: list[list[int]], eos: int, max_tokens: int) -> EncodedTargets:
    """`head + reply` of each target within `max_tokens`, ended by eos when it fits. A target that does not
    keeps its first `max_tokens` tokens and no eos: an eos after a cut would teach the model to stop
    mid-sentence, and would weigh an unlikely end-of-reply in a cut candidate's score."""
    ids, starts, cut = [], [], []
    for head, reply in zip(heads, replies):
        row = head + reply
        was_cut = len(row) >= max_tokens
        ids.append(row[:max_tokens] if was_cut else row + [eos])
        starts.append(min(len(head), max_tokens) if was_cut else len(head))
        cut.append(was_cut)
    return EncodedTargets(ids, starts, cut)


class MarkerFormat:
    """This project's markers (`format_source`, `format_target`), for scratch models and pretrained
    models without a chat template."""

    name = "markers"

    def prompts(self, tokenizer, sources: Sequence[Source], max_tokens: int, is_seq2seq: bool) -> list[list[int]]:
        """Each source within `max_tokens` (`encode_sources`), followed by `<|bot|>` for a causal model."""
        ids = encode_sources(tokenizer, sources, max_tokens)
        if is_seq2seq:
            return ids
        bot = tokenizer.convert_tokens_to_ids(BOT)
        return [row + [bot] for row in ids]

    def targets(self, tokenizer, replies: Sequence[str], rots: Sequence[Sequence[str]], rot_target: bool,
                max_tokens: int) -> EncodedTargets:
        """`<|rot|> RoT <|response|>` (or `<|response|>`) then the reply, ended by eos; the reply starts
        after `<|response|>`."""
        heads = [format_target("", r, rot_target) for r in rots]  # "... <|response|> "
        head_ids = tokenizer([h.rstrip() for h in heads], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer([f" {reply}" for reply in replies], add_special_tokens=False)["input_ids"]
        return _cut_targets(head_ids, reply_ids, tokenizer.eos_token_id, max_tokens)

    def read(self, tokenizer, ids: Sequence[int]) -> Reading:
        text = decode_target(tokenizer, ids)
        rot, reply = split_candidate(text)
        return Reading(text, rot, reply, reply_tokens(tokenizer, ids))


class ChatFormat:
    """A causal chat model's own template; the target is the assistant turn, `Rule of thumb: RoT` on
    its first line when there is one, then the reply (plain text: nothing is added to the vocabulary)."""

    name = "chat_template"

    def messages(self, source: Source) -> list[dict]:
        """The chat messages of a source: persona and emotion as a system turn (none without them, so
        the template's default system turn applies), then the turns, roles assigned from the end."""
        system = []
        if len(source.persona):
            system.append(f"Your persona: {' '.join(source.persona)}")
        if source.emotion:
            system.append(f"The conversation's emotion: {source.emotion}")
        last = len(source.context) - 1
        turns = [{"role": "user" if (last - i) % 2 == 0 else "assistant", "content": turn}
                 for i, turn in enumerate(source.context)]
        return ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns

    def prompts(self, tokenizer, sources: Sequence[Source], max_tokens: int, is_seq2seq: bool = False) -> list[list[int]]:
        """Each source through the chat template with its generation prompt, within `max_tokens`: whole
        oldest turns are dropped first (the system turn is kept); a latest turn that alone is too long
        keeps its last tokens."""
        return [self._prompt(tokenizer, source, max_tokens) for source in sources]

    def _prompt(self, tokenizer, source: Source, max_tokens: int) -> list[int]:
        context = list(source.context)
        for start in range(len(context)):
            ids = _template_ids(tokenizer, self.messages(source._replace(context=context[start:])))
            if len(ids) <= max_tokens:
                return ids
        latest = tokenizer(context[-1], add_special_tokens=False)["input_ids"] if context else []
        keep = len(latest)
        while True:
            # The latest turn alone is too long: cut its text from the start until the prompt fits.
            turn = tokenizer.decode(latest[len(latest) - keep:]) if keep > 0 else ""
            ids = _template_ids(tokenizer, self.messages(source._replace(context=[turn])))
            if len(ids) <= max_tokens:
                return ids
            if keep == 0:
                raise DataError(f"a context window of {max_tokens} tokens cannot hold the chat template's own "
                                f"text ({len(ids)} tokens with an empty turn); raise max_source_tokens")
            keep = max(0, keep - max(1, len(ids) - max_tokens))

    def targets(self, tokenizer, replies: Sequence[str], rots: Sequence[Sequence[str]], rot_target: bool,
                max_tokens: int) -> EncodedTargets:
        """`Rule of thumb: RoT` and a newline (when there is a RoT and `rot_target`), then the reply,
        ended by the end-of-turn token (eos); the reply starts after the newline."""
        heads = [f"{RULE_OF_THUMB} {' '.join(r)}\n" if rot_target and len(r) else "" for r in rots]
        head_ids = [tokenizer(h, add_special_tokens=False)["input_ids"] if h else [] for h in heads]
        reply_ids = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
        return _cut_targets(head_ids, reply_ids, tokenizer.eos_token_id, max_tokens)

    def read(self, tokenizer, ids: Sequence[int]) -> Reading:
        """The RoT is the rest of a first line that starts with `Rule of thumb:` (with no newline after
        it, the whole text is a RoT that ran to the length limit, and the reply is empty); the reply is
        what follows, up to a special token that would start a new turn."""
        ended = len(ids) > 0 and ids[-1] == tokenizer.eos_token_id
        body = list(ids[:-1] if ended else ids)
        special = set(tokenizer.all_special_ids)
        cut = next((i for i, token in enumerate(body) if token in special), len(body))
        text = tokenizer.decode(body[:cut])
        start, rot = 0, None
        if text.lstrip().startswith(RULE_OF_THUMB):
            # The reply starts at the first token whose text completes the RoT's line.
            start = next((i for i in range(1, cut + 1)
                          if "\n" in tokenizer.decode(body[:i]).lstrip()[len(RULE_OF_THUMB):]), None)
            line = text.lstrip()[len(RULE_OF_THUMB):].split("\n", 1)[0]
            rot = " ".join(line.split()) or None
            if start is None:
                return Reading(text.strip(), rot, "", [False] * len(ids))
        reply = " ".join(tokenizer.decode(body[start:cut]).split())
        mask = [start <= i < cut for i in range(len(body))] + ([cut == len(body)] if ended else [])
        return Reading(text.strip(), rot, reply, mask)


DialogFormat = MarkerFormat | ChatFormat
MARKER_FORMAT, CHAT_FORMAT = MarkerFormat(), ChatFormat()


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos


def dialog_format(tokenizer, is_seq2seq: bool, where: str) -> DialogFormat:
    """The markers when the tokenizer has them all, else the chat template of a causal model; a model
    with neither is a one-line DataError."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if not missing:
        return MARKER_FORMAT
    if tokenizer.chat_template and not is_seq2seq:
        return CHAT_FORMAT
    raise DataError(f"{where}: tokenizer lacks the special tokens {', '.join(missing)} and has no chat template "
                    "(models must be prepared by the base_model stage)")


# --- reading a generated target (marker format) ---------------------------------------------------


def decode_target(tokenizer, ids: Sequence[int]) -> str:
    """The generated text with the RoT/reply markers kept and eos, pad and bos dropped."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def split_candidate(text: str) -> tuple[str | None, str]:
    """(rot, reply) of a generated target; a reply that starts a new turn (`<|user|>`, ...) ends there."""
    cut = min((text.index(m) for m in CONTEXT_MARKERS if m in text), default=len(text))
    return parse_target(text[:cut])


def reply_tokens(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Which of a marker-format target's tokens the parsed reply was read from, the tokens its fluency
    averages.

    The target is parsed as `split_candidate` parses its text: the reply starts after the last
    `<|response|>` that follows the first `<|rot|>` (after the last `<|response|>` without a `<|rot|>`;
    at the start with neither marker; nowhere when a `<|rot|>` has no `<|response|>` after it) and ends
    before the first marker of a new turn; marker, pad and bos tokens inside it do not count. The eos
    counts when the reply ended there, so the model's choice to stop is part of its fluency as in
    training; a reply cut at a new turn or at `max_new_tokens` has no eos to count.
    """
    ended = len(ids) > 0 and ids[-1] == tokenizer.eos_token_id
    body = list(ids[:-1] if ended else ids)
    to_id = tokenizer.convert_tokens_to_ids
    rot, response = to_id(ROT), to_id(RESPONSE)
    turn_markers = {to_id(m) for m in CONTEXT_MARKERS}
    cut = next((i for i, token in enumerate(body) if token in turn_markers), len(body))
    head = body[:cut]
    first = head.index(rot) if rot in head else -1
    responses = [i for i, token in enumerate(head) if token == response and i > first]
    start = responses[-1] + 1 if responses else (0 if first < 0 else None)
    if start is None:
        return [False] * len(ids)
    skip = {rot, response, tokenizer.pad_token_id, tokenizer.bos_token_id}
    mask = [start <= i < cut and token not in skip for i, token in enumerate(body)]
    return mask + ([cut == len(body)] if ended else [])


# --- scoring --------------------------------------------------------------------------------------


def token_logprobs(dm: DialogModel, prompt_ids: list[list[int]], target_ids: list[list[int]],
                   candidates_per_source: int = 1) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Log-probability of every target token given its prompt, in one batched forward pass.

    `prompt_ids` has S rows (`DialogModel.format.prompts`: for a causal model the prompt ends with the
    token the target's first token follows); `target_ids` has S * C rows, C = `candidates_per_source`,
    grouped by prompt (rows s*C .. s*C+C-1 belong to prompt s). Each prompt is read once and shared
    across its C candidates: a sequence-to-sequence model encodes it once; a causal model reads
    `prompt target`, and with C > 1 reads the prompt once and its C targets from the prompt's key/value
    cache. Returns `logps` (S*C, T) and `mask` (S*C, T) with 1 on real target tokens, 0 on padding.
    """
    logits, labels, target_mask = target_logits(dm, prompt_ids, target_ids, candidates_per_source)
    return logprobs_of(logits, labels, target_mask)


def logprobs_of(logits: "torch.Tensor", labels: "torch.Tensor", target_mask: "torch.Tensor"):
    """Each label's log-probability under `logits` (S*C, T, V), zero where `target_mask` is 0; and the mask."""
    import torch

    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (S*C, T)
    return logps * target_mask, target_mask


def target_logits(dm: DialogModel, prompt_ids: list[list[int]], target_ids: list[list[int]],
                  candidates_per_source: int = 1) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The logits that predict every target token (S*C, T, V), the target tokens (S*C, T) and their mask,
    as `token_logprobs` reads them (same arguments)."""
    import torch

    model, tokenizer = dm.model, dm.tokenizer
    pad = tokenizer.pad_token_id
    C = candidates_per_source
    if dm.is_seq2seq:
        enc_ids, enc_mask = _pad(prompt_ids, pad)  # (S, L)
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
    elif C > 1 and min(len(p) for p in prompt_ids) > 1:
        return _shared_source_logits(dm, prompt_ids, target_ids, C)
    else:
        # Rows `prompt target`, left-padded so that every row's target ends at the last position: the output
        # layer then runs on the last T + 1 positions only (`logits_to_keep`), not on every prompt token.
        rows = [prompt_ids[index // C] + target for index, target in enumerate(target_ids)]
        ids, attention = _pad(rows, pad, left=True)  # (S*C, L+T)
        device = next(model.parameters()).device
        ids, attention = ids.to(device), attention.to(device)
        width = max(len(t) for t in target_ids)
        kept = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                     logits_to_keep=width + 1).logits  # (S*C, T+1, V): positions L+T-T-1 .. L+T-1
        labels, target_mask = (t.to(device) for t in _pad(target_ids, pad))  # (S*C, T), right-padded
        lengths = target_mask.sum(-1, keepdim=True)  # (S*C, 1)
        # Token j of a target of length n sits at position end - n + j, predicted at end - n + j - 1: in the
        # kept positions, index width - n + j.
        positions = (width - lengths + torch.arange(width, device=device).unsqueeze(0)).clamp(max=width)  # (S*C, T)
        logits = kept.gather(1, positions.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))
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


def _shared_source_logits(dm: DialogModel, prompt_ids: list[list[int]], target_ids: list[list[int]], C: int):
    """`target_logits` of a causal model whose prompts each have C > 1 targets: the left-padded prompts
    but their last token in one forward pass, their key/value cache repeated C times, then each prompt's
    last token and its target (the target's last token dropped: nothing is predicted after it) read from
    that cache at the positions the prompts end at. The same logits as reading `prompt target` whole, up
    to float rounding, with the prompt read once rather than C times and the output layer applied to the
    target positions only (tested)."""
    import torch

    model, tokenizer = dm.model, dm.tokenizer
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    source, source_mask = (t.to(device) for t in _pad([p[:-1] for p in prompt_ids], pad, left=True))  # (S, L)
    cache_name = cache_keyword(model)
    out = model(input_ids=source, attention_mask=source_mask, position_ids=(source_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    cache.batch_repeat_interleave(C)
    labels, target_mask = (t.to(device) for t in _pad(target_ids, pad))  # (S*C, T)
    bridge = torch.tensor([p[-1] for p in prompt_ids], device=device).repeat_interleave(C).unsqueeze(1)  # (S*C, 1)
    inputs = torch.cat([bridge, labels[:, :-1]], dim=1)  # (S*C, T)
    ends = source_mask.sum(-1).repeat_interleave(C).unsqueeze(1)  # (S*C, 1): where the prompt's last token goes
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
