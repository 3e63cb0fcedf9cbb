"""The shared text format and the batched scorer, checked against a one-example-at-a-time loop."""

import pytest
import torch

from pipeline.modeling import (
    BOT, SPECIAL_TOKENS, DialogModel, Source, encode_sources, encode_targets, format_source,
    format_target, parse_target, token_logprobs, train_tokenizer,
)

TEXTS = ["hello there, how are you?", "i am fine, thanks for asking.", "you should not lie to friends.",
         "it's wrong to steal.", "what did you do today?", "i went hiking with my dog."] * 5


def test_format_source_assigns_speakers_from_the_end():
    assert format_source(["a", "b", "c"]) == "<|user|> a <|bot|> b <|user|> c"
    assert format_source(["b", "c"], persona=["p1.", "p2."], emotion="proud") == \
        "<|persona|> p1. p2. <|emotion|> proud <|bot|> b <|user|> c"


def test_format_target_puts_the_rot_first_and_can_switch_it_off():
    assert format_target("ok.", ["Be kind.", "Be fair."]) == "<|rot|> Be kind. Be fair. <|response|> ok."
    assert format_target("ok.", ["Be kind."], rot_target=False) == "<|response|> ok."
    assert format_target("ok.", []) == "<|response|> ok."


@pytest.mark.parametrize("text, expected", [
    ("<|rot|> Be kind. <|response|> Sure thing.", ("Be kind.", "Sure thing.")),
    ("<|response|> Sure thing.", (None, "Sure thing.")),
    ("Sure thing.", (None, "Sure thing.")),  # no marker at all: all reply
    ("<|rot|> It is wrong to lie and you should never", ("It is wrong to lie and you should never", "")),
    ("<|rot|> Be kind. <|response|>", ("Be kind.", "")),  # empty reply
    ("<|rot|>  <|response|> hi", (None, "hi")),  # empty RoT counts as none
    ("", (None, "")),
])
def test_parse_target(text, expected):
    assert parse_target(text) == expected


def test_parse_target_inverts_format_target():
    assert parse_target(format_target("Tell me more!", ["It's good to listen."])) == ("It's good to listen.", "Tell me more!")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_tokenizer_keeps_markers_whole(tokenizer):
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def _tiny_models(tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(tokenizer)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=tokenizer.eos_token_id))
    return [DialogModel(gpt2.eval(), tokenizer, False), DialogModel(bart.eval(), tokenizer, True)]


def _one_at_a_time(dm, source, target):
    """Reference: the target's token log-probs from a plain, unbatched, unpadded forward pass."""
    tok = dm.tokenizer
    if dm.is_seq2seq:
        start = dm.model.config.decoder_start_token_id
        out = dm.model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([[start] + target[:-1]]))
        logits = out.logits[0]
    else:
        ids = source + [tok.convert_tokens_to_ids(BOT)] + target
        logits = dm.model(input_ids=torch.tensor([ids])).logits[0, len(source): len(source) + len(target)]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)


def test_batched_scores_equal_unbatched_ones_and_mask_padding(tokenizer):
    sources = encode_sources(tokenizer, [Source(["hello there, how are you?"]),
                                         Source(["what did you do today?", "i went hiking.", "nice!"])], 64)
    targets, _ = encode_targets(tokenizer, [format_target("i am fine.", ["Be kind."]), format_target("ok"),
                                            format_target("it's wrong to steal."), format_target("you lie", ["x"])], 32)
    for dm in _tiny_models(tokenizer):
        with torch.no_grad():
            logps, mask = token_logprobs(dm, sources, targets, candidates_per_source=2)
            assert logps.shape == mask.shape == (4, max(len(t) for t in targets))
            for row, target in enumerate(targets):
                expected = _one_at_a_time(dm, sources[row // 2], target)
                assert mask[row].sum().item() == len(target)
                assert torch.allclose(logps[row, : len(target)], expected, atol=1e-5)
                assert torch.all(logps[row, len(target):] == 0)


def test_a_long_source_keeps_its_prefix_and_latest_turns_and_drops_the_oldest(tokenizer):
    """The old left cut ate the persona/emotion prefix first; now whole turns go, oldest first."""
    turns = [f"turn number {i} says something long enough to count." for i in range(12)]
    source = Source(turns, persona=["i love hiking."], emotion="proud")
    full = tokenizer(source.text, add_special_tokens=False)["input_ids"]
    budget = len(full) // 2
    (ids,) = encode_sources(tokenizer, [source], budget)
    assert len(ids) <= budget
    # By hand: the longest suffix of whole turns that fits beside the prefix.
    for keep in range(len(turns), 0, -1):
        expected = tokenizer(format_source(turns[-keep:], ["i love hiking."], "proud"), add_special_tokens=False)["input_ids"]
        if len(expected) <= budget:
            break
    assert ids == expected
    text = tokenizer.decode(ids)
    assert text.startswith("<|persona|> i love hiking. <|emotion|> proud") and turns[-1] in text and turns[0] not in text
    (short,) = encode_sources(tokenizer, [Source(["hi"], persona=["p."])], budget)
    assert short == tokenizer(format_source(["hi"], ["p."]), add_special_tokens=False)["input_ids"]  # no cut


def test_a_latest_turn_longer_than_the_budget_keeps_its_marker_and_last_tokens(tokenizer):
    (ids,) = encode_sources(tokenizer, [Source(["old turn.", "word " * 50 + "the end"], persona=["p."])], 16)
    assert len(ids) == 16
    text = tokenizer.decode(ids)
    assert text.startswith("<|persona|> p.") and "<|user|>" in text and text.endswith("the end")
    assert "old turn" not in text


def test_a_cut_target_keeps_its_first_tokens_and_no_eos(tokenizer):
    """The old cut kept eos after the last kept token, teaching the model to stop mid-sentence."""
    long, short = "you should not lie to friends. " * 10, "it's wrong to steal."
    long_ids, short_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (long, short))
    budget = len(short_ids) + 1  # the short target and its eos fit exactly
    targets, cut = encode_targets(tokenizer, [long, short], budget)
    assert targets == [long_ids[:budget], short_ids + [tokenizer.eos_token_id]] and cut == [True, False]
    # One token less: the short target keeps all its tokens but has no room for eos, so it is cut.
    targets, cut = encode_targets(tokenizer, [short], budget - 1)
    assert targets == [short_ids] and cut == [True]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_shared_source_scores_and_gradients_equal_reading_each_candidate_whole(tokenizer, lora):
    # With C > 1 a causal model reads each source once and its C targets from the source's key/value
    # cache; the log-probabilities and the gradients must be those of reading `source <|bot|> target`
    # once per candidate (C = 1 on the repeated sources), sources of different lengths included, also
    # through peft's wrapper (which names the cache argument differently from transformers).
    sources = encode_sources(tokenizer, [Source(["hello there, how are you?"]),
                                         Source(["what did you do today?", "i went hiking.", "nice!"])], 64)
    targets, _ = encode_targets(tokenizer, [format_target(t) for t in
                                            ("i am fine.", "ok", "no", "it's wrong to steal.", "you lie", "sure, why not?")], 32)
    dm = _tiny_models(tokenizer)[0]
    if lora:
        from peft import LoraConfig, get_peft_model

        dm = DialogModel(get_peft_model(dm.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)),
                         tokenizer, False)
    results = []
    for shared in (True, False):
        dm.model.zero_grad()
        if shared:
            logps, mask = token_logprobs(dm, sources, targets, candidates_per_source=3)
        else:
            logps, mask = token_logprobs(dm, [s for s in sources for _ in range(3)], targets, candidates_per_source=1)
        (logps * torch.arange(1, logps.shape[0] + 1).unsqueeze(1)).sum().backward()  # rows weighted differently
        results.append((logps.detach(), mask, {n: p.grad.clone() for n, p in dm.model.named_parameters() if p.requires_grad}))
    (shared_logps, shared_mask, shared_grads), (whole_logps, whole_mask, whole_grads) = results
    assert torch.equal(shared_mask, whole_mask)
    assert torch.allclose(shared_logps, whole_logps, atol=1e-5)
    assert shared_grads.keys() == whole_grads.keys()
    for name, grad in shared_grads.items():
        assert torch.allclose(grad, whole_grads[name], atol=1e-5, rtol=1e-4), name
