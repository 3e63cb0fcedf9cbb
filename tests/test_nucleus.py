"""The sampler (`pipeline.nucleus.Nucleus`, `Sampler`): transformers' temperature, top-k and top-p found
among each row's most likely tokens, a row whose nucleus lies beyond them sorted whole, tokens drawn in
proportion to the kept probabilities, and `generate` taking the drawn token."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from pipeline.config import GenerateConfig
from pipeline.modeling import Source, _pad, load_dialog_model
from pipeline.nucleus import Nucleus, Sampler
from pipeline.sampling import encode_prompts, generate_batch, generation_settings, neutral_generation_defaults, pad_id

CONFIGS = [(1.0, 0, 0.9), (0.7, 0, 0.95), (1.0, 20, 0.9), (1.3, 40, 0.8), (0.5, 5, 1.0), (1.0, 0, 0.5), (2.0, 0, 1.0)]


def transformers_filters(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What `generate` does to the logits when it samples (its warpers, in its order)."""
    scores = scores.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def peaked(rows: int, vocabulary: int, seed: int) -> torch.Tensor:
    """Logits like a trained model's: a few likely tokens, a long tail, some rows flatter than others."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(1.0, 8.0, rows)[:, None]
    return torch.randn(rows, vocabulary, generator=generator) * scale


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
@pytest.mark.parametrize("vocabulary", [300, 5000])
def test_the_kept_tokens_and_their_logits_are_transformers(temperature, top_k, top_p, vocabulary):
    scores = peaked(48, vocabulary, seed=vocabulary)
    nucleus = Nucleus(temperature, top_k, top_p, width=16)
    if top_p < 1.0 and not top_k:  # both paths are taken: the fast one and the whole sort
        inside = nucleus.candidates(scores)[2]
        assert inside.any() and not inside.all()
    ours, theirs = nucleus(None, scores), transformers_filters(scores, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(theirs)
    assert torch.allclose(ours[kept], theirs[kept])


def test_on_flat_logits_they_differ_only_where_rounding_decides():
    """With 49,152 nearly equal probabilities the nucleus's edge lies among tokens whose mass above is
    within float32 rounding of top_p; anywhere else the kept set is transformers'."""
    scores = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * 0.5
    ours = torch.isfinite(Nucleus(top_p=0.9)(None, scores))
    theirs = torch.isfinite(transformers_filters(scores, 1.0, 0, 0.9))
    probs = scores.double().softmax(dim=-1)
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(1, order)
    above = torch.zeros_like(probs).scatter_(1, order, ranked.cumsum(dim=-1) - ranked)  # the exact mass above each token
    differ = ours != theirs
    assert ((above[differ] - 0.9).abs() < 1e-4).all()
    assert differ.sum().item() <= 0.001 * ours.sum().item()


def test_draws_follow_the_kept_distribution_on_both_paths():
    """Half the rows peaked (their nucleus among the 3 most likely: one multinomial over those), half flat
    (sorted whole); each half's token frequencies match transformers' filtered softmax."""
    peaked_row = torch.tensor([4.0, 3.0, 2.5, 0.0, -1.0, -2.0, -3.0, -4.0])
    flat_row = torch.tensor([0.3, 0.2, 0.1, 0.0, 0.0, -0.1, -0.2, -0.3])
    n = 20000
    scores = torch.cat([peaked_row.expand(n, -1), flat_row.expand(n, -1)])
    nucleus = Nucleus(0.9, 0, 0.8, width=3)
    inside = nucleus.candidates(scores)[2]
    assert inside[:n].all() and not inside[n:].any()
    torch.manual_seed(0)
    tokens = nucleus.draw(scores)
    for half, row in ((tokens[:n], peaked_row), (tokens[n:], flat_row)):
        expected = transformers_filters(row[None], 0.9, 0, 0.8).softmax(dim=-1)[0]
        observed = torch.bincount(half, minlength=8).double() / n
        assert (observed - expected).abs().max().item() < 0.012  # 4 standard errors at most
        assert observed[expected == 0].sum().item() == 0  # nothing outside the nucleus, ever


def test_the_draw_follows_the_seed():
    scores = peaked(64, 500, seed=1)
    nucleus = Nucleus(top_p=0.9, width=8)
    torch.manual_seed(3)
    first = nucleus.draw(scores)
    torch.manual_seed(3)
    assert torch.equal(nucleus.draw(scores), first)
    torch.manual_seed(4)
    assert not torch.equal(nucleus.draw(scores), first)


def test_the_sampler_hands_generate_exactly_the_drawn_token():
    scores = peaked(4, 50, seed=2)
    torch.manual_seed(7)
    chosen = Nucleus(top_p=0.9).draw(scores)
    torch.manual_seed(7)
    onehot = Sampler(Nucleus(top_p=0.9))(None, scores)
    assert torch.equal(onehot.argmax(dim=-1), chosen)
    assert torch.isfinite(onehot).sum().item() == 4


def test_every_generated_token_lies_in_the_nucleus_of_the_models_own_logits(tiny_dialog_model_dir):
    dm = load_dialog_model(tiny_dialog_model_dir)
    dm.model.eval()
    config = GenerateConfig(k=3, max_new_tokens=10, temperature=1.5, top_p=0.6)
    prompts = encode_prompts(dm, [Source(["hi"]), Source(["what did you do today?", "i went hiking."])], config)
    ids, attention = _pad(prompts, pad_id(dm.tokenizer), left=True)
    decoding, sampler = generation_settings(dm, config)
    assert decoding["do_sample"] is False and decoding["top_p"] is None and len(sampler) == 1
    ids, attention = ids.repeat_interleave(3, dim=0), attention.repeat_interleave(3, dim=0)
    torch.manual_seed(1)
    with torch.no_grad(), neutral_generation_defaults(dm.model):
        out = dm.model.generate(input_ids=ids, attention_mask=attention, return_dict_in_generate=True,
                                output_logits=True, generation_config=GenerationConfig(**decoding),
                                logits_processor=LogitsProcessorList(sampler))
    new = out.sequences[:, ids.shape[1]:]
    kept = [torch.isfinite(Nucleus.of(config)(None, step)) for step in out.logits]
    eos = dm.tokenizer.eos_token_id
    checked = 0
    for row in range(new.shape[0]):
        for t, token in enumerate(new[row].tolist()):
            assert kept[t][row, token], (row, t, token)
            checked += 1
            if token == eos:
                break
    assert checked >= 6
    # generate_batch draws the same tokens for the seed
    targets, _ = generate_batch(dm, prompts, config, seed=1)
    assert targets[0] == new[0, : len(targets[0])].tolist()
