"""Drawing the next token: temperature, top-k and top-p as transformers applies them, without sorting the
whole vocabulary at every step (`Nucleus`), and the logits processor that samples with it (`Sampler`).

Shared by `pipeline.sampling` (every sampled candidate) and `pipeline.dexperts` (the guided model's
filters), so alpha 0 is the guided model's own decoding token for token.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import GenerateConfig

NUCLEUS_WIDTH = 256  # the most likely tokens a row's nucleus is looked for in before its whole vocabulary is sorted


@dataclasses.dataclass(frozen=True)
class Nucleus:
    """Temperature, top-k and top-p as transformers applies them when sampling (`TemperatureLogitsWarper`,
    `TopKLogitsWarper`, `TopPLogitsWarper`, in that order, at least one token kept; ties at the k-th
    value aside), found among each row's `width` most likely tokens (a partial `topk`) instead of a sort
    of the whole vocabulary: transformers' top-p sorts all 49,152 logits of every row at every step,
    and its `multinomial` draws over the whole vocabulary: for SmolLM2's 32 rows on two cores, 118 ms a
    step against 25.5 ms here (bench/README.md). A row whose kept tokens do not all lie among its `width` most likely (a
    flat distribution) is sorted whole, so the kept set is transformers' (up to float rounding at the
    nucleus's edge: the mass above a token is summed from the top here, from the bottom there).

    Called as a logits warper `(input_ids, scores)`, it returns the filtered logits (temperature applied,
    -inf outside the kept set); `draw` samples one token per row from them.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    width: int = NUCLEUS_WIDTH

    @classmethod
    def of(cls, config: GenerateConfig) -> Nucleus:
        return cls(config.temperature, config.top_k, config.top_p)

    @property
    def filters(self) -> bool:
        """Whether anything is filtered (or scaled): False for temperature 1 with top-k and top-p off."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0

    def candidates(self, scores, width: int | None = None):
        """(values, indices, inside) of each row's `width` most likely tokens, in descending order:
        `values` the scaled logits, -inf where a token is filtered out; `inside` (R,) whether the row's
        kept tokens all lie among them (always with `width` the vocabulary size)."""
        import torch

        z = scores.float()
        if self.temperature != 1.0:
            z = z / self.temperature
        vocabulary = z.shape[-1]
        width = min(width or self.width, vocabulary)
        k = min(self.top_k, vocabulary) if self.top_k > 0 else vocabulary
        values, indices = z.topk(width, dim=-1)  # (R, width), descending
        if k < width:
            values[:, k:] = -torch.inf
        if self.top_p < 1.0:
            # The top-p mass is of the distribution left after top-k, as transformers renormalizes it.
            rest = values if k <= width else z.topk(k, dim=-1).values if k < vocabulary else z
            probs = (values - rest.logsumexp(dim=-1, keepdim=True)).exp()
            mass = probs.cumsum(dim=-1)
            dropped = (mass - probs) >= self.top_p  # the mass above the token reaches top_p already
            dropped[:, 0] = False
            values = values.masked_fill(dropped, -torch.inf)
            inside = (mass[:, -1] >= self.top_p) | (k <= width)
        else:
            finite = torch.isfinite(z).sum(dim=-1).clamp(max=k)
            inside = finite <= width
        return values, indices, inside

    def parts(self, scores) -> list:
        """[(rows, values, indices)] covering every row once: the rows whose kept tokens lie among their
        `width` most likely with those `candidates`, then the others sorted whole; `rows` is None when
        the first part is every row."""
        values, indices, inside = self.candidates(scores)
        if bool(inside.all()):
            return [(None, values, indices)]
        fast, slow = inside.nonzero().squeeze(1), (~inside).nonzero().squeeze(1)
        whole, order, _ = self.candidates(scores[slow], width=scores.shape[-1])
        return ([(fast, values[fast], indices[fast])] if len(fast) else []) + [(slow, whole, order)]

    def __call__(self, input_ids, scores):
        import torch

        if not self.filters:
            return scores.float()
        out = torch.full(scores.shape, -torch.inf, dtype=torch.float32, device=scores.device)
        for rows, values, indices in self.parts(scores):
            if rows is None:
                out.scatter_(1, indices, values)
            else:
                out[rows] = torch.full((len(rows), scores.shape[-1]), -torch.inf, device=scores.device).scatter_(
                    1, indices, values)
        return out

    def draw(self, scores):
        """One token id per row (R,), sampled from the kept tokens in proportion to their probability:
        one `multinomial` per part (`parts`: the rows whose nucleus lies among their `width` most likely
        tokens over those, then the others over the whole vocabulary). Uses torch's global generator."""
        import torch

        tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for rows, values, indices in self.parts(scores):
            chosen = indices.gather(1, torch.multinomial(values.softmax(dim=-1), 1)).squeeze(1)
            if rows is None:
                return chosen
            tokens[rows] = chosen
        return tokens


class Sampler:
    """The logits processor that samples: `nucleus.draw` picks each row's token, and the scores come back
    0 there and -inf elsewhere, so `generate`, run greedy, takes exactly that token. `generate` keeps
    the raw logits (`output_logits`) for the fluency; only the draw moves here."""

    def __init__(self, nucleus: Nucleus):
        self.nucleus = nucleus

    def __call__(self, input_ids, scores):
        import torch

        tokens = self.nucleus.draw(scores)
        return torch.full_like(scores, -torch.inf).scatter_(1, tokens[:, None], 0.0)
