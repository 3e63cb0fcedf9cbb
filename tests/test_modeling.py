"""The shared text format and the batched scorer, checked against a one-example-at-a-time loop."""

import pytest
import torch

from pipeline.modeling import (
    BOT, SPECIAL_TOKENS, DialogModel, MarkerFormat, Source, encode_sources, format_source,
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


def _one_at_a_time(dm, prompt, target):
    """Reference: the target's token log-probs from a plain, unbatched, unpadded forward pass over
    `prompt target` (a causal model; the prompt is the source and `<|bot|>` in the markers) or with the
    prompt encoded (seq2seq)."""
    if dm.is_seq2seq:
        start = dm.model.config.decoder_start_token_id
        out = dm.model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + target[:-1]]))
        logits = out.logits[0]
    else:
        logits = dm.model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(target)]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)


def test_marker_prompts_end_in_bot_for_a_causal_model_only(tokenizer):
    sources = [Source(["hello there, how are you?"])]
    plain = encode_sources(tokenizer, sources, 64)
    bot = tokenizer.convert_tokens_to_ids(BOT)
    assert MarkerFormat().prompts(tokenizer, sources, 64, is_seq2seq=False) == [plain[0] + [bot]]
    assert MarkerFormat().prompts(tokenizer, sources, 64, is_seq2seq=True) == plain


def test_batched_scores_equal_unbatched_ones_and_mask_padding(tokenizer):
    sources = [Source(["hello there, how are you?"]), Source(["what did you do today?", "i went hiking.", "nice!"])]
    targets = MarkerFormat().targets(tokenizer, ["i am fine.", "ok", "it's wrong to steal.", "you lie"],
                                     [["Be kind."], [], [], ["x"]], True, 32).ids
    for dm in _tiny_models(tokenizer):
        prompts = dm.format.prompts(tokenizer, sources, 64, dm.is_seq2seq)
        with torch.no_grad():
            logps, mask = token_logprobs(dm, prompts, targets, candidates_per_source=2)
            assert logps.shape == mask.shape == (4, max(len(t) for t in targets))
            for row, target in enumerate(targets):
                expected = _one_at_a_time(dm, prompts[row // 2], target)
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
    long_ids, short_ids = (tokenizer(format_target(t), add_special_tokens=False)["input_ids"] for t in (long, short))
    budget = len(short_ids) + 1  # the short target and its eos fit exactly
    encoded = MarkerFormat().targets(tokenizer, [long, short], [[], []], True, budget)
    assert encoded.ids == [long_ids[:budget], short_ids + [tokenizer.eos_token_id]] and encoded.cut == [True, False]
    assert encoded.reply_starts == [1, 1]  # after <|response|>
    # One token less: the short target keeps all its tokens but has no room for eos, so it is cut.
    encoded = MarkerFormat().targets(tokenizer, [short], [[]], True, budget - 1)
    assert encoded.ids == [short_ids] and encoded.cut == [True]


def _scoring_model(kind: str, tokenizer, chat_dir):
    """The model a scoring test runs on: the tiny GPT-2 in the markers, or the tiny Llama (rotary
    positions, grouped-query attention) in its chat template."""
    if kind == "markers":
        return _tiny_models(tokenizer)[0]
    from pipeline.modeling import load_dialog_model

    return load_dialog_model(chat_dir)


SOURCES = [Source(["hello there, how are you?"]), Source(["what did you do today?", "i went hiking.", "nice!"], ["i love hiking."])]
REPLIES = ["i am fine.", "ok", "no", "it's wrong to steal.", "you lie", "sure, why not?"]


@pytest.mark.parametrize("kind", ["markers", "chat_template"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_shared_source_scores_and_gradients_equal_reading_each_candidate_whole(tokenizer, tiny_chat_model_dir, kind, lora):
    # With C > 1 a causal model reads each prompt once and its C targets from the prompt's key/value
    # cache; the log-probabilities and the gradients must be those of reading `prompt target` once per
    # candidate (C = 1 on the repeated prompts), prompts of different lengths included, also through
    # peft's wrapper (which names the cache argument differently from transformers), and on a Llama
    # (rotary positions continued from where each left-padded prompt ends).
    dm = _scoring_model(kind, tokenizer, tiny_chat_model_dir)
    tok = dm.tokenizer
    sources = dm.format.prompts(tok, SOURCES, 200, False)
    assert len({len(p) for p in sources}) == 2
    targets = dm.format.targets(tok, REPLIES, [["Be kind."]] * 6, True, 32).ids
    if lora:
        from peft import LoraConfig, get_peft_model

        dm = DialogModel(get_peft_model(dm.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                             target_modules=None if kind == "markers" else ["q_proj", "v_proj"])),
                         tok, False)
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
        # Relative to the gradient's size: the tiny Llama's random weights give gradients in the hundreds.
        assert (grad - whole_grads[name]).norm() <= 1e-5 * whole_grads[name].norm() + 1e-6, name
    # And both equal a plain forward pass over one unpadded `prompt target` at a time.
    with torch.no_grad():
        for row, target in enumerate(targets):
            expected = _one_at_a_time(dm, sources[row // 3], target)
            assert torch.allclose(shared_logps[row, : len(target)], expected, atol=1e-5)


# --- the chat format ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat():
    from tests.conftest import chat_tokenizer

    return chat_tokenizer()


def test_the_format_follows_the_tokenizer(tokenizer, chat):
    from pipeline.modeling import ChatFormat, dialog_format
    from pipeline.errors import DataError

    assert isinstance(dialog_format(tokenizer, False, "m"), MarkerFormat)
    assert isinstance(dialog_format(tokenizer, True, "m"), MarkerFormat)
    assert isinstance(dialog_format(chat, False, "m"), ChatFormat)
    with pytest.raises(DataError, match="m: tokenizer lacks the special tokens .* and has no chat template"):
        dialog_format(chat, True, "m")  # a sequence-to-sequence model is not read in a chat template
    chat.chat_template = None
    try:
        with pytest.raises(DataError, match="no chat template"):
            dialog_format(chat, False, "m")
    finally:
        from tests.conftest import CHATML_TEMPLATE

        chat.chat_template = CHATML_TEMPLATE


def test_a_chat_prompt_is_the_template_with_roles_from_the_end_and_persona_as_system(chat):
    from pipeline.modeling import ChatFormat

    [ids] = ChatFormat().prompts(chat, [Source(["hi there", "hello", "how are you?"], ["i love hiking."], "proud")], 200)
    assert chat.decode(ids) == ("<|im_start|>system\nYour persona: i love hiking.\nThe conversation's emotion: proud"
                                "<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                                "<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n")
    [plain] = ChatFormat().prompts(chat, [Source(["how are you?"])], 200)  # no persona: the template's own system turn
    assert chat.decode(plain).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ids == chat(chat.decode(ids), add_special_tokens=False)["input_ids"]


def test_a_long_chat_prompt_loses_its_oldest_turns_first_and_keeps_the_system_turn(chat):
    from pipeline.modeling import ChatFormat

    turns = [f"turn number {i} says something long enough to count." for i in range(8)]
    source = Source(turns, persona=["i love hiking."])
    full = ChatFormat().prompts(chat, [source], 10_000)[0]
    budget = len(full) // 2
    [ids] = ChatFormat().prompts(chat, [source], budget)
    # By hand: the longest suffix of whole turns whose prompt fits.
    for keep in range(len(turns), 0, -1):
        expected = ChatFormat().prompts(chat, [source._replace(context=turns[-keep:])], 10_000)[0]
        if len(expected) <= budget:
            break
    assert ids == expected and len(ids) <= budget and 1 <= keep < len(turns)
    text = chat.decode(ids)
    assert "Your persona: i love hiking." in text and turns[-1] in text and turns[0] not in text
    # A latest turn that alone is too long keeps its end, inside the template.
    [ids] = ChatFormat().prompts(chat, [Source(["old turn.", "word " * 60 + "the end"])], 60)
    text = chat.decode(ids)
    assert len(ids) <= 60 and text.endswith("the end<|im_end|>\n<|im_start|>assistant\n") and "old turn" not in text


def test_a_chat_target_is_the_rot_line_then_the_reply_and_the_end_of_turn(chat):
    from pipeline.modeling import ChatFormat

    encoded = ChatFormat().targets(chat, ["i am fine.", "ok", "ok"], [["Be kind.", "Be fair."], [], ["Be kind."]],
                                   True, 32)
    texts = [chat.decode(ids) for ids in encoded.ids]
    assert texts == ["Rule of thumb: Be kind. Be fair.\ni am fine.<|im_end|>", "ok<|im_end|>",
                     "Rule of thumb: Be kind.\nok<|im_end|>"]
    head = chat("Rule of thumb: Be kind. Be fair.\n", add_special_tokens=False)["input_ids"]
    assert encoded.reply_starts == [len(head), 0, len(chat("Rule of thumb: Be kind.\n")["input_ids"])]
    assert encoded.cut == [False, False, False]
    off = ChatFormat().targets(chat, ["i am fine."], [["Be kind."]], False, 32)
    assert [chat.decode(ids) for ids in off.ids] == ["i am fine.<|im_end|>"] and off.reply_starts == [0]
    # A target longer than the budget keeps its first tokens and no end of turn.
    cut = ChatFormat().targets(chat, ["word " * 40], [["Be kind."]], True, 16)
    assert cut.cut == [True] and len(cut.ids[0]) == 16 and chat.eos_token_id not in cut.ids[0]


@pytest.mark.parametrize("rots, reply", [(["Be kind."], "i am fine."), ([], "ok, sure!"), (["It's wrong to lie."], ""),
                                         (["a", "b"], "two rules.")])
def test_reading_a_chat_target_back_inverts_writing_it(chat, rots, reply):
    from pipeline.modeling import ChatFormat

    encoded = ChatFormat().targets(chat, [reply], [rots], True, 64)
    reading = ChatFormat().read(chat, encoded.ids[0])
    assert (reading.rot, reading.reply) == (" ".join(rots) or None, reply)
    # The reply is read from exactly the tokens the training score covers: from reply_start, eos included.
    start = encoded.reply_starts[0]
    assert reading.reply_mask == [i >= start for i in range(len(encoded.ids[0]))]


def test_reading_a_chat_target_by_hand(chat):
    from pipeline.modeling import ChatFormat

    def read(text, ended=True):
        ids = chat(text, add_special_tokens=False)["input_ids"] + ([chat.eos_token_id] if ended else [])
        return ChatFormat().read(chat, ids)

    assert read("Rule of thumb: be kind.\nsure thing")[1:3] == ("be kind.", "sure thing")
    assert read("Rule of thumb: it is wrong to lie and", ended=False)[1:] == \
        ("it is wrong to lie and", "", [False] * len(chat("Rule of thumb: it is wrong to lie and")["input_ids"]))
    assert read("sure thing")[1:3] == (None, "sure thing")  # no RoT line: all reply
    assert read("rule of thumb, no colon\nhi")[1:3] == (None, "rule of thumb, no colon hi")  # only the exact prefix
    assert read("Rule of thumb:\nhi")[1:3] == (None, "hi")  # an empty RoT is none
    # A special token that would start a new turn ends the reply; nothing after it counts.
    reading = read("Rule of thumb: be kind.\nsure<|im_start|>user\nhi")
    assert reading[1:3] == ("be kind.", "sure")
    ids = chat("Rule of thumb: be kind.\nsure<|im_start|>user\nhi", add_special_tokens=False)["input_ids"]
    kept = [t for t, keep in zip(ids + [chat.eos_token_id], reading.reply_mask) if keep]
    assert chat.decode(kept) == "sure"  # cut at a new turn: no eos counted
