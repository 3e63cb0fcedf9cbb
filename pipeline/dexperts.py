"""DExperts (Liu et al., ACL 2021): steering an unchanged dialog model at decoding time with an expert
and an anti-expert.

At every step of sampling, the guided model's next-token logits `z` are filtered as `generate`
would filter them alone (temperature, then top-k, then top-p, as transformers' warpers do:
`pipeline.nucleus.Nucleus`, so the nucleus is the guided model's, as in DExperts), and the experts'
difference is added:

    logits = filter(z / T) + alpha / T * (z_expert - z_antiexpert)

which is DExperts' `(filter(z) + alpha * (z_expert - z_antiexpert)) / T` up to where the temperature
is applied (identical at `generate.temperature = 1`). A token outside the nucleus stays impossible;
`alpha = 0` is the guided model's own decoding, token for token (`tests/test_dexperts.py`).

The experts (`pipeline/stages/experts.py`) are fine-tuned from the base model, so they share its
tokenizer with the guided model (`base` or `ce`); a different vocabulary is a one-line error. They
read the same prompt ids as the guided model (its own format, `DialogModel.format`) and keep their own
key/value caches, with positions counted over the prompt's real tokens (left padding), as `generate`
counts them for the guided model. The experts learned replies without RoTs, so while the guided model
writes its RoT they are off their training distribution; their difference there is applied all the
same (DExperts guides every step).

`Ensemble` scores a teacher-forced target under the same combination without filtering: the
log-probability that `score` reports as DExperts' likelihood safety.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.config import GenerateConfig
from pipeline.errors import DataError
from pipeline.modeling import DialogModel, cache_keyword, logprobs_of, target_logits
from pipeline.nucleus import Nucleus

EXPERT, ANTIEXPERT = "expert", "antiexpert"  # the two subfolders of the experts' folder


@dataclasses.dataclass
class Experts:
    """The expert and the anti-expert, in eval mode, and the weight of their difference; `divergence`
    sums, over the tokens sampled under their guidance, KL(guided sampling distribution with the experts
    || without them) and counts the tokens (`mean_divergence` reads and resets it)."""

    expert: DialogModel
    antiexpert: DialogModel
    alpha: float
    divergence: list = dataclasses.field(default_factory=lambda: [0.0, 0])

    def take_divergence(self) -> tuple[float | None, int]:
        """(the mean per-token KL in nats, the tokens it is over) since the last call, the mean None when
        no token was sampled; resets."""
        total, tokens = self.divergence
        self.divergence[:] = [0.0, 0]
        return (total / tokens if tokens else None), tokens

    def mean_divergence(self) -> float | None:
        """The mean per-token KL (nats) since the last call, None when no token was sampled; resets."""
        return self.take_divergence()[0]


def load_experts(folder: Path, guided: DialogModel, alpha: float, device: str = "cpu") -> Experts:
    """The two experts of `folder` (`<folder>/expert`, `<folder>/antiexpert`) on `device`; each must
    have the guided model's tokenizer and architecture (a mismatch is a one-line DataError)."""
    from pipeline.modeling import load_dialog_model

    folder = Path(folder)
    loaded = {}
    for name in (EXPERT, ANTIEXPERT):
        path = folder / name
        if not path.is_dir():
            raise DataError(f"{path}: expert folder not found (it is written by the experts stage)")
        dm = load_dialog_model(path, device)
        dm.model.eval()
        check_same_vocabulary(guided, dm)
        loaded[name] = dm
    return Experts(loaded[EXPERT], loaded[ANTIEXPERT], alpha)


def check_same_vocabulary(guided: DialogModel, expert: DialogModel) -> None:
    """DExperts adds logits token by token: the expert's tokenizer and output size must be the guided
    model's, and both causal or both sequence-to-sequence."""
    ours, theirs = guided.tokenizer.get_vocab(), expert.tokenizer.get_vocab()
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:1]
        raise DataError(f"{expert.path}: its tokenizer differs from the guided model's ({guided.path}): "
                        f"{len(theirs)} tokens against {len(ours)}, e.g. {differing[0] if differing else '?'}; "
                        "DExperts needs one vocabulary (train the experts from the guided model's base)")
    if expert.is_seq2seq != guided.is_seq2seq:
        raise DataError(f"{expert.path}: a {'seq2seq' if expert.is_seq2seq else 'causal'} expert cannot guide "
                        f"the {'seq2seq' if guided.is_seq2seq else 'causal'} model at {guided.path}")
    sizes = (guided.model.get_output_embeddings().weight.shape[0], expert.model.get_output_embeddings().weight.shape[0])
    if sizes[0] != sizes[1]:
        raise DataError(f"{expert.path}: {sizes[1]} output logits against the guided model's {sizes[0]} ({guided.path})")


def combine(base_logits: torch.Tensor, expert_logits: torch.Tensor, antiexpert_logits: torch.Tensor, alpha: float,
            filters=()) -> torch.Tensor:
    """`filters` applied in turn to `base_logits` (each called like a transformers logits warper,
    `(input_ids, scores)`; the input ids are not read by temperature, top-k or top-p), plus
    `alpha * (expert - antiexpert)`, all in float32."""
    return filtered(base_logits, filters) + alpha * (expert_logits.float() - antiexpert_logits.float())


def filtered(logits: torch.Tensor, filters=()) -> torch.Tensor:
    """`filters` (logits warpers, `Nucleus`) applied in turn to `logits`, in float32."""
    scores = logits.float()
    for warp in filters:
        scores = warp(None, scores)
    return scores


def sampling_filters(config: GenerateConfig) -> list:
    """The filters sampling with `config` alone applies (`pipeline.nucleus.Nucleus`: temperature, top-k,
    top-p in transformers' order, at least one token kept): none for greedy decoding or when all three
    are off."""
    nucleus = Nucleus.of(config)
    return [nucleus] if config.do_sample and nucleus.filters else []


def unfiltered(config: GenerateConfig) -> GenerateConfig:
    """`config` with the filters off, for the `generate` call whose logits processor applies them itself
    (the sampler then draws from the combined logits as they are)."""
    return dataclasses.replace(config, temperature=1.0, top_k=0, top_p=1.0)


class _ExpertState:
    """One expert's incremental forward passes over the growing sequences of one `generate` call, whose
    rows are the S prompts (S, L) repeated k times each (rows s*k .. s*k+k-1); a causal expert reads each
    prompt once and repeats its key/value cache k times."""

    def __init__(self, dm: DialogModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int):
        self.dm, self.k = dm, k
        self.unique_ids, self.unique_mask = prompt_ids, prompt_mask  # (S, L)
        self.prompt_ids, self.prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        self.cache, self.positions, self.encoder = None, None, None
        self.cache_name = cache_keyword(dm.model)  # looked up once, not at every step

    @torch.no_grad()
    def next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.dm.model
        if self.dm.is_seq2seq:
            if self.encoder is None:
                self.encoder = model.get_encoder()(input_ids=self.prompt_ids, attention_mask=self.prompt_mask)
            step = input_ids if self.cache is None else input_ids[:, -1:]
            out = model(encoder_outputs=self.encoder, attention_mask=self.prompt_mask, decoder_input_ids=step,
                        use_cache=True, **self._cache_argument())
        elif self.cache is None:
            # The first step (generate calls the processor after reading the prompts): each prompt once,
            # then its logits and cache repeated for its k rows.
            positions = (self.unique_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=self.unique_ids, attention_mask=self.unique_mask, position_ids=positions,
                        use_cache=True, logits_to_keep=1)
            self.cache = out.get("cache", None) or out.get("past_key_values", None)
            self.cache.batch_repeat_interleave(self.k)
            self.positions = positions[:, -1:].repeat_interleave(self.k, 0)
            return out.logits[:, -1, :].repeat_interleave(self.k, 0)
        else:
            new = input_ids.shape[1] - self.prompt_ids.shape[1]
            mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(len(input_ids), new)], dim=1)
            self.positions = self.positions + 1
            out = model(input_ids=input_ids[:, -1:], attention_mask=mask, position_ids=self.positions, use_cache=True,
                        **self._cache_argument())
        self.cache = out.get("cache", None) or out.get("past_key_values", None)
        return out.logits[:, -1, :]

    def _cache_argument(self) -> dict:
        return {} if self.cache is None else {self.cache_name: self.cache}


class Guidance:
    """The logits processor of one `generate` call: `combine` of the guided model's logits and the
    experts' at every step. Built from the call's prompt ids and attention mask (S, L); `generate`
    repeats each prompt `k` times (rows s*k .. s*k+k-1), as the processor does. Each step adds to
    `experts.divergence` the KL of the combined distribution from the guided model's own (both after
    the sampling filters) for every row that has not ended. `record` keeps each step's combined logits
    (for tests)."""

    def __init__(self, experts: Experts, config: GenerateConfig, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, record: bool = False):
        self.experts, self.filters = experts, sampling_filters(config)
        scale = config.temperature if config.do_sample else 1.0
        self.weight = experts.alpha / scale  # the difference is scaled by the temperature like the logits
        self.states = [_ExpertState(dm, prompt_ids, prompt_mask, config.k) for dm in (experts.expert, experts.antiexpert)]
        self.prompt_length, self.eos = prompt_ids.shape[1], experts.expert.tokenizer.eos_token_id
        self.steps: list[torch.Tensor] | None = [] if record else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        expert, antiexpert = (state.next_logits(input_ids) for state in self.states)
        own = filtered(scores, self.filters)  # kept for the divergence: the guided model's own sampling
        combined = combine(own, expert, antiexpert, self.weight)
        self.add_divergence(input_ids, own, combined)
        if self.steps is not None:
            self.steps.append(combined.detach().clone())
        return combined

    def add_divergence(self, input_ids: torch.Tensor, own: torch.Tensor, combined: torch.Tensor) -> None:
        """KL(softmax(combined) || softmax(own)) of the rows still generating: no eos yet among the
        tokens sampled so far (after the prompt, which a causal model's `input_ids` hold, or after a
        sequence-to-sequence model's decoder start token). A filtered-out token is -inf in both, so it
        adds nothing."""
        start = 1 if self.experts.expert.is_seq2seq else self.prompt_length
        active = ~(input_ids[:, start:] == self.eos).any(dim=-1)
        logp, logq = torch.log_softmax(combined, dim=-1), torch.log_softmax(own, dim=-1)
        terms = torch.where(torch.isfinite(logp), logp.exp() * (logp - logq), torch.zeros_like(logp))
        kl = terms.sum(dim=-1)[active]
        self.experts.divergence[0] += float(kl.sum())
        self.experts.divergence[1] += int(active.sum())


def guidance_settings(experts: Experts, config: GenerateConfig, folder: Path, guided: str) -> dict:
    """What stats.json records of the guidance beside `decoding` (the configured settings, which the
    processor applies to the guided model's logits)."""
    return {"guided": guided, "alpha": experts.alpha, "experts": str(folder),
            "filters": [dataclasses.asdict(f) for f in sampling_filters(config)],
            "rule": "filter(z_guided / T) + alpha / T * (z_expert - z_antiexpert); drawn by pipeline.nucleus.Sampler"}


class Ensemble(torch.nn.Module):
    """A `scoring.GroupScorer` for DExperts: the teacher-forced log-probability of each target token
    under `log_softmax(z_guided + alpha * (z_expert - z_antiexpert))`, no filtering."""

    def __init__(self, guided: DialogModel, experts: Experts):
        super().__init__()
        self.guided, self.experts = guided, experts
        self.model = guided.model  # what the scorer's callers read (device, config)
        self.tokenizer, self.is_seq2seq = guided.tokenizer, guided.is_seq2seq

    def forward(self, prompt_ids, target_ids, candidates_per_source: int):
        logits, labels, mask = target_logits(self.guided, prompt_ids, target_ids, candidates_per_source)
        expert = target_logits(self.experts.expert, prompt_ids, target_ids, candidates_per_source)[0]
        antiexpert = target_logits(self.experts.antiexpert, prompt_ids, target_ids, candidates_per_source)[0]
        return logprobs_of(combine(logits, expert, antiexpert, self.experts.alpha), labels, mask)
