"""The generate stage: decoding exactly as configured, prompt formats (the project's and audited models'
native ones), reply-only fluency, distinct contexts with all their references, the written
candidates, audit models and bad input. Models are tiny (conftest's random `tiny_dialog_model_dir`,
or a "scripted" model whose next token is fixed by hand); the safety classifier is conftest's
FakeSafetyScorer, so every score can be checked by hand."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CORPORA, AuditModel, GenerateConfig
from pipeline.errors import DataError
from pipeline.modeling import (
    BOT, RESPONSE, ROT, USER, DialogModel, Source, decode_target, encode_sources, load_dialog_model, reply_tokens,
    split_candidate,
)
from pipeline.sampling import (
    PromptFormat, Sampled, batch_seed, decoding_settings, encode_prompts, generate_batch, native_prompt,
    reply_fluency, resolve_format, sample_candidates,
)
from pipeline.schemas import CANDIDATES, NORMALIZED
from pipeline.stages import generate
from pipeline.stages.generate import candidates_table, distinct_contexts, load_model, select_contexts

SMALL = {"seed": 0, "max_contexts": 3, "k": 2, "batch_size": 2, "max_new_tokens": 6}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *parts):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def write_params(path: Path, generate_section: dict, audit_models: dict | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"generate": generate_section, "audit": {"models": audit_models or {}}}))
    return path


def normalized_row(corpus, index, **fields):
    row = {"corpus": corpus, "split": "test", "dialogue_id": f"d{index}", "turn_index": 1,
           "context": [f"hello there, how are you? {index}"], "response": "i am fine, thanks for asking.",
           "rots": [], "safety_label": None, "persona": [], "emotion": None, "unacceptable_responses": [],
           "derived_split": False}
    return {**row, **fields}


def write_split(folder: Path, corpus: str, rows: list[dict]) -> None:
    (folder / corpus).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=NORMALIZED), folder / corpus / "test.parquet")


@pytest.fixture
def normalized_dir(tmp_path) -> Path:
    """Five test rows per corpus; ProsocialDialog rows carry labels and RoTs, PersonaChat a persona,
    EmpatheticDialogues an emotion, DiaSafety a category and a human label of the reply (safe), ToxiChat
    a responder."""
    extra = {"prosocial_dialog": {"safety_label": "__needs_caution__", "rots": ["you should not lie to friends."]},
             "persona_chat": {"persona": ["i went hiking with my dog."]},
             "empathetic_dialogues": {"emotion": "proud"},
             "diasafety": {"reply_label": "safe", "reply_category": "Risk Ignorance"},
             "toxichat": {"reply_label": "safe", "reply_offensive": False, "reply_agrees_offensive": False,
                          "responder": "human"}}
    for corpus in CORPORA:
        write_split(tmp_path / "normalized", corpus, [normalized_row(corpus, i, **extra.get(corpus, {})) for i in range(5)])
    return tmp_path / "normalized"


def sample(dm: DialogModel, sources: list[Source], config: GenerateConfig, seed: int) -> list[list[int]]:
    """The `config.k` sampled target ids of each source, in the project's format."""
    return generate_batch(dm, encode_prompts(dm, sources, config), config, seed, logprobs=False)[0]


@pytest.fixture(scope="module")
def dm(tiny_dialog_model_dir) -> DialogModel:
    model = load_dialog_model(tiny_dialog_model_dir)
    model.model.eval()
    return model


def plain_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer that knows nothing of the dialog markers and has no pad (like DialoGPT's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello there, how are you?", "i am fine.", "<user> <assistant>"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


# A chat template of the common shape: each message as <role>content<eos>, then the assistant's prompt.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_general_model(folder: Path, chat_template: str | None = None) -> Path:
    """A general-purpose causal checkpoint: a tiny random GPT-2 whose tokenizer has no markers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = plain_tokenizer(chat_template)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- pieces ---------------------------------------------------------------------------------------


def test_contexts_are_drawn_with_the_seed_in_file_order():
    rows = [{"i": i} for i in range(10)]
    chosen = select_contexts(rows, "mic", 4, seed=0)
    assert len(chosen) == 4 and [r["i"] for r in chosen] == sorted(r["i"] for r in chosen)
    assert chosen == select_contexts(rows, "mic", 4, seed=0)
    assert any(select_contexts(rows, "mic", 4, seed=s) != chosen for s in range(1, 5))
    assert select_contexts(rows, "mic", 0, seed=0) == rows  # 0: all
    assert select_contexts(rows[:3], "mic", 4, seed=0) == rows[:3]


def test_rows_with_the_same_context_are_one_context_with_every_reference():
    """MIC: several annotators answer one question; each answer is a row with the same context."""
    q1 = normalized_row("mic", 0, dialogue_id="q1", turn_index=0, context=["can i lie?"], response="no, never.")
    q2 = normalized_row("mic", 1, dialogue_id="q2", turn_index=0, context=["may i steal?"], response="no.")
    q1b = normalized_row("mic", 2, dialogue_id="q1", turn_index=2, context=["can i lie?"], response="better not.")
    q1c = normalized_row("mic", 3, dialogue_id="q1", turn_index=3, context=["can i lie?"], response="no, never.")
    # same turns, another speaker's persona: another model input, so another context
    other = normalized_row("mic", 4, context=["can i lie?"], persona=["i am honest."], response="never!")
    contexts = distinct_contexts([q1, q2, q1b, q1c, other])
    assert [c["dialogue_id"] for c in contexts] == ["q1", "q2", "d4"]  # file order of the first row
    assert contexts[0]["turn_index"] == 0 and contexts[0]["response"] == "no, never."
    assert contexts[0]["references"] == ["no, never.", "better not.", "no, never."]  # its own first
    assert contexts[1]["references"] == ["no."] and contexts[2]["references"] == ["never!"]


def test_replies_labelled_unsafe_are_never_references_and_the_category_is_carried():
    """DiaSafety: one context with a safe and two unsafe replies, one whose only reply is unsafe."""
    rows = [normalized_row("diasafety", 0, dialogue_id="c", turn_index=0, context=["i feel dizzy."],
                           response="you will be fine, ignore it.", reply_label="unsafe",
                           reply_category="Unauthorized Expertise"),
            normalized_row("diasafety", 1, dialogue_id="c", turn_index=1, context=["i feel dizzy."],
                           response="please see a doctor.", reply_label="safe", reply_category="Unauthorized Expertise"),
            normalized_row("diasafety", 2, dialogue_id="c", turn_index=2, context=["i feel dizzy."],
                           response="take more pills.", reply_label="unsafe", reply_category="Unauthorized Expertise"),
            normalized_row("diasafety", 3, dialogue_id="t", turn_index=0, context=["tourists are pigs."],
                           response="so true.", reply_label="unsafe", reply_category="Toxicity Agreement"),
            normalized_row("mic", 4, dialogue_id="q", turn_index=0, context=["can i lie?"], response="no.")]
    dizzy, tourists, question = distinct_contexts(rows)
    assert dizzy["references"] == ["please see a doctor."] and dizzy["reference"] == "please see a doctor."
    assert dizzy["category"] == "Unauthorized Expertise" and dizzy["turn_index"] == 0
    assert tourists["references"] == [] and tourists["reference"] is None
    assert tourists["category"] == "Toxicity Agreement"
    # unlabelled replies (every other corpus) are references as before
    assert question["references"] == ["no."] and question["reference"] == "no." and question["category"] is None


def test_a_context_without_a_reference_gets_candidates_and_no_overlap_score(monkeypatch):
    """The all-unsafe context is generated for, and evaluate's overlap metrics count only the other."""
    from conftest import FakeJudge, FakeSafetyScorer

    from pipeline.stages import evaluate

    monkeypatch.setattr(generate, "sample_candidates", fixed_sampler)
    rows = [normalized_row("diasafety", 0, dialogue_id="c", turn_index=0, context=["i feel dizzy."],
                           response="you are right", reply_label="safe", reply_category="Risk Ignorance"),
            normalized_row("diasafety", 1, dialogue_id="t", turn_index=0, context=["tourists are pigs."],
                           response="so true.", reply_label="unsafe", reply_category="Toxicity Agreement")]
    table, stats = candidates_table(None, FakeSafetyScorer(), rows, "stage2", "diasafety", GenerateConfig(k=3),
                                    progress=False)
    data = table.to_pydict()
    assert table.num_rows == 6 and data["context_id"][3:] == ["diasafety/t/0"] * 3
    assert data["reference"][3:] == [None] * 3 and data["references"][3:] == [[]] * 3
    assert data["category"] == ["Risk Ignorance"] * 3 + ["Toxicity Agreement"] * 3
    assert stats["contexts_without_reference"] == 1
    items = evaluate.item_scores(evaluate.judged(evaluate.context_table(table, "diasafety"), FakeJudge(), 0.5, "x"))
    metrics, _ = evaluate.aggregate(items, n_samples=100, seed=0)
    # the selected reply of c is "no" (FIXED: score 0.9 + 1/2), the first "you are right" = its reference
    assert metrics["f1_first"]["n"] == 1 and metrics["f1_first"]["value"] == pytest.approx(1.0)
    assert metrics["f1_reranked"]["n"] == 1 and metrics["f1_reranked"]["value"] == pytest.approx(0.0)


def test_batch_seeds_depend_on_seed_corpus_and_batch_only():
    assert batch_seed(0, "mic", 1) == batch_seed(0, "mic", 1)
    assert len({batch_seed(0, "mic", 1), batch_seed(1, "mic", 1), batch_seed(0, "mic", 2), batch_seed(0, "dd", 1)}) == 4


@pytest.mark.parametrize("text, expected", [
    ("<|rot|> Be kind. <|response|> Sure. <|user|> and then", ("Be kind.", "Sure.")),  # a new turn ends the reply
    ("<|response|> Sure.<|bot|>", (None, "Sure.")),
    ("Sure.", (None, "Sure.")),  # no marker: all reply, no RoT
    ("<|rot|> It is wrong to lie and you", ("It is wrong to lie and you", "")),  # RoT ran to the length limit
    ("<|rot|> Be kind. <|response|>", ("Be kind.", "")),  # empty reply
])
def test_split_candidate(text, expected):
    assert split_candidate(text) == expected


def test_decoding_keeps_the_markers_and_drops_eos_and_padding(dm):
    tok = dm.tokenizer
    ids = tok("<|rot|> it's wrong to steal. <|response|> i am fine.", add_special_tokens=False)["input_ids"]
    text = decode_target(tok, ids + [tok.eos_token_id, tok.pad_token_id])
    assert split_candidate(text) == ("it's wrong to steal.", "i am fine.")


def test_batched_left_padded_generation_equals_one_context_at_a_time(dm):
    from transformers import BartConfig, BartForConditionalGeneration

    tok = dm.tokenizer
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, init_std=0.3,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        decoder_start_token_id=tok.eos_token_id)).eval()
    sources = [Source(["hi"]), Source(["what did you do today?", "i went hiking.", "nice!"]), Source(["you should not lie"])]
    greedy = GenerateConfig(k=1, do_sample=False, max_new_tokens=10)
    for model in (dm, DialogModel(bart, tok, True)):
        batched = sample(model, sources, greedy, seed=0)
        single = [sample(model, [source], greedy, seed=0)[0] for source in sources]
        assert batched == single
        assert len({tuple(t) for t in batched}) > 1  # the contexts really differ


def test_sampling_is_reproducible_gives_k_per_source_and_cuts_at_eos(dm):
    sources = [Source(["hi"]), Source(["what did you do today?"])]
    config = GenerateConfig(k=3, max_new_tokens=6)
    first = sample(dm, sources, config, seed=7)
    assert first == sample(dm, sources, config, seed=7)
    assert first != sample(dm, sources, config, seed=8)
    assert len(first) == 6
    eos = dm.tokenizer.eos_token_id
    for target in first:
        assert eos not in target[:-1] and (target[-1] == eos or len(target) == 6)


# --- decoding exactly as configured (issue 11, defect 2) -------------------------------------------

# Settings a checkpoint may carry in its generation_config.json, each of which changes the output.
HIDDEN_DEFAULTS = {"min_length": 20, "no_repeat_ngram_size": 1, "encoder_no_repeat_ngram_size": 1,
                   "repetition_penalty": 5.0, "suppress_tokens": list(range(5, 150)), "forced_bos_token_id": 210,
                   "bad_words_ids": [[200], [201], [202]], "num_beams": 3, "top_k": 2, "temperature": 0.05}


def checkpoint_pair(tmp_path, model, tokenizer) -> tuple[DialogModel, DialogModel]:
    """The same weights loaded twice: without a generation_config.json, and with one full of `HIDDEN_DEFAULTS`."""
    clean, hidden = tmp_path / "clean", tmp_path / "hidden"
    for folder in (clean, hidden):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (clean / "generation_config.json").unlink(missing_ok=True)
    settings = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                "decoder_start_token_id": tokenizer.eos_token_id, **HIDDEN_DEFAULTS}
    (hidden / "generation_config.json").write_text(json.dumps(settings))
    loaded = load_dialog_model(clean), load_dialog_model(hidden)
    assert loaded[1].model.generation_config.min_length == 20  # transformers did read the hidden defaults
    return loaded


@pytest.mark.parametrize("architecture", ["causal", "seq2seq"])
def test_a_checkpoints_own_generation_defaults_do_not_change_the_output(tmp_path, dm, architecture):
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    tok = dm.tokenizer
    if architecture == "causal":
        model = dm.model
    else:
        torch.manual_seed(0)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            init_std=0.3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id))
    clean, hidden = checkpoint_pair(tmp_path, model, tok)
    sources = [Source(["hi"]), Source(["what did you do today?", "i went hiking."])]
    for config in (GenerateConfig(k=1, do_sample=False, max_new_tokens=8), GenerateConfig(k=3, max_new_tokens=8)):
        assert sample(hidden, sources, config, seed=3) == sample(clean, sources, config, seed=3)
    # What the old code did (a GenerationConfig with some fields set): the hidden defaults take over.
    greedy = GenerateConfig(k=1, do_sample=False, max_new_tokens=8)
    partial = GenerationConfig(max_new_tokens=8, num_beams=1, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
    prompts = torch.tensor(encode_prompts(hidden, sources[:1], greedy))
    with pytest.warns(UserWarning, match="min_length"):  # the hidden min_length is in force
        old = hidden.model.generate(input_ids=prompts, generation_config=partial)
    new_tokens = old[0, 1:] if architecture == "seq2seq" else old[0, prompts.shape[1]:]
    assert new_tokens.tolist()[:8] != sample(clean, sources[:1], greedy, seed=0)[0][:8]


def test_the_decoding_settings_are_params_only_and_complete(dm):
    settings = decoding_settings(dm, GenerateConfig(k=3, max_new_tokens=9, temperature=0.7, top_p=0.8, top_k=5))
    assert {key: settings[key] for key in ("max_new_tokens", "num_return_sequences", "do_sample", "temperature",
                                           "top_p", "top_k", "num_beams")} == \
        {"max_new_tokens": 9, "num_return_sequences": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.8,
         "top_k": 5, "num_beams": 1}
    # every constraint a checkpoint could carry is set, to its neutral value
    assert settings["min_length"] == 0 and settings["no_repeat_ngram_size"] == 0
    assert settings["encoder_no_repeat_ngram_size"] == 0 and settings["repetition_penalty"] == 1.0
    assert settings["forced_bos_token_id"] is None and settings["forced_eos_token_id"] is None
    assert settings["suppress_tokens"] is None and settings["bad_words_ids"] is None
    assert set(HIDDEN_DEFAULTS) <= set(settings)
    assert settings["eos_token_id"] == dm.tokenizer.eos_token_id and settings["pad_token_id"] == dm.tokenizer.pad_token_id
    greedy = decoding_settings(dm, GenerateConfig(k=1, do_sample=False))
    assert greedy["do_sample"] is False and greedy["temperature"] is None  # unused by greedy decoding


# --- fluency of the reply tokens only (issue 11, defect 6) ---------------------------------------


def test_reply_tokens_by_hand(dm):
    tok = dm.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in (ROT, RESPONSE, USER, BOT)}
    a, b, c, d = tok("hello there", add_special_tokens=False)["input_ids"][:2] + \
        tok("fine", add_special_tokens=False)["input_ids"][:1] + tok("dog", add_special_tokens=False)["input_ids"][:1]
    eos = tok.eos_token_id
    rot, response, user = ids[ROT], ids[RESPONSE], ids[USER]
    cases = [
        ([rot, a, response, b, c, eos], [0, 0, 0, 1, 1, 1]),  # RoT out, reply and its natural eos in
        ([rot, a, response, b, user, c, eos], [0, 0, 0, 1, 0, 0, 0]),  # cut at a new turn: no eos
        ([response, b, c], [0, 1, 1]),  # cut at max_new_tokens: no eos to count
        ([rot, a, b], [0, 0, 0]),  # a RoT that ran to the length limit: no reply
        ([rot, a, eos], [0, 0, 0]),  # a RoT that ended without a reply
        ([b, c, eos], [1, 1, 1]),  # no marker: all reply
        ([response, eos], [0, 1]),  # an empty reply that ended: only its eos
        ([rot, a, response, b, response, c, eos], [0, 0, 0, 0, 0, 1, 1]),  # the last <|response|> starts it
        ([response, b, rot, c, d, eos], [0, 0, 0, 0, 0, 0]),  # a RoT after the reply has no <|response|> after it
    ]
    for target, expected in cases:
        assert reply_tokens(tok, target) == [bool(x) for x in expected], tok.decode(target)
        # the reply text is read from exactly these tokens
        kept = [t for t, keep in zip(target, reply_tokens(tok, target)) if keep and t != eos]
        assert split_candidate(decode_target(tok, target))[1] == " ".join(tok.decode(kept).split())
    assert reply_fluency([-1.0, -2.0, -4.0], [False, True, True]) == -3.0
    assert reply_fluency([-1.0, -2.0], [False, False]) == -math.inf


def scripted_model(tokenizer, script: dict[int, tuple[int, float]]) -> DialogModel:
    """A causal model whose next token depends on the current one only: after token x it puts about
    probability p on y for (y, p) = script[x], the rest spread evenly; after any other token, uniform.

    GPT-2 with one-hot embeddings, no positions, attention and MLP outputs zeroed, so the last
    hidden state is layernorm(one_hot(x)), and an untied LM head that maps it to the scripted logits.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    V = len(tokenizer)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=V, n_layer=1, n_head=1, n_positions=128,
                                       tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.wte.weight.copy_(torch.eye(V))
        model.transformer.ln_f.weight.fill_(1.0)
        hot = (1 - 1 / V) / math.sqrt((1 / V) * (1 - 1 / V) + 1e-5)  # layernorm(one_hot(x))[x]
        for x, (y, p) in script.items():
            model.lm_head.weight[y, x] = math.log(p / (1 - p) * (V - 1)) / hot
    return DialogModel(model.eval(), tokenizer, False)


@pytest.mark.parametrize("shape", ["cut at a new turn", "ended"])
def test_fluency_is_the_mean_log_probability_of_the_reply_tokens(dm, shape):
    """Checked against a plain forward pass over `source <|bot|> target` for the reply's tokens, and
    against the probabilities the script sets by hand."""
    tok = dm.tokenizer
    a, b, c, d, e = (tok(word, add_special_tokens=False)["input_ids"][0] for word in ("hi", "you", "fine", "dog", "lie"))
    assert len({a, b, c, d, e}) == 5
    bot, rot, response, user, eos = (tok.convert_tokens_to_ids(t) for t in (BOT, ROT, RESPONSE, USER, "</s>"))
    if shape == "cut at a new turn":  # <|rot|> a b <|response|> c d <|user|> e </s>
        chain = [(bot, 0.9), (rot, 0.3), (a, 0.4), (b, 0.5), (response, 0.6), (c, 0.7), (d, 0.8), (user, 0.35),
                 (e, 0.95), (eos, None)]
        reply_probabilities = [0.6, 0.7]  # c and d; <|user|> ends the reply, so neither it nor eos counts
    else:  # <|rot|> a <|response|> c d </s>
        chain = [(bot, 0.9), (rot, 0.3), (a, 0.5), (response, 0.6), (c, 0.7), (d, 0.8), (eos, None)]
        reply_probabilities = [0.6, 0.7, 0.8]  # c, d and the eos that ended the reply
    script = {x: (chain[i + 1][0], p) for i, (x, p) in enumerate(chain[:-1])}
    model = scripted_model(tok, script)
    source = Source(["hi"])
    sampled = sample_candidates(model, [source], GenerateConfig(k=1, do_sample=False, max_new_tokens=12), seed=0)
    target = [x for x, _ in chain[1:]]
    rot_ids = [a, b] if shape == "cut at a new turn" else [a]
    assert sampled.texts == [decode_target(tok, target)]
    assert sampled.rots == [tok.decode(rot_ids).strip()] and sampled.responses == [tok.decode([c, d]).strip()]
    prefix = encode_sources(tok, [source], 64)[0] + [bot]
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([prefix + target])).logits[0]
    logps = torch.log_softmax(logits[len(prefix) - 1: len(prefix) - 1 + len(target)], -1)
    logps = logps.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor(reply_tokens(tok, target))
    assert mask.sum().item() == len(reply_probabilities)
    assert sampled.fluency[0] == pytest.approx(logps[mask].mean().item(), abs=1e-5)
    assert sampled.fluency[0] == pytest.approx(np.mean(np.log(reply_probabilities)), abs=0.02)
    assert abs(sampled.fluency[0] - logps.mean().item()) > 0.1  # the whole target's mean is another number
    assert sampled.capped == 0  # it ended with eos before max_new_tokens
    short = sample_candidates(model, [source], GenerateConfig(k=1, do_sample=False, max_new_tokens=4), seed=0)
    assert short.capped == 1 and short.tokens == 4


def test_fluency_equals_a_plain_forward_pass_for_sampled_batches(dm):
    """Sampled, left-padded, k per source: each candidate's fluency against its own forward pass."""
    sources = [Source(["hi"]), Source(["what did you do today?", "i went hiking."])]
    config = GenerateConfig(k=2, max_new_tokens=6)
    sampled = sample_candidates(dm, sources, config, seed=3)
    source_ids = encode_sources(dm.tokenizer, sources, 64)
    targets = sample(dm, sources, config, seed=3)  # the same seed: the same candidates
    bot = dm.tokenizer.convert_tokens_to_ids(BOT)
    for row, target in enumerate(targets):
        prefix = source_ids[row // 2] + [bot]
        with torch.no_grad():
            logits = dm.model(input_ids=torch.tensor([prefix + target])).logits[0]
        logps = torch.log_softmax(logits[len(prefix) - 1: len(prefix) - 1 + len(target)], -1)
        logps = logps.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)
        mask = torch.tensor(reply_tokens(dm.tokenizer, target))
        expected = logps[mask].mean().item() if mask.any() else -math.inf
        assert sampled.fluency[row] == pytest.approx(expected, abs=1e-5)


# --- native prompt formats of audited models (issue 11, defect 5) ---------------------------------


def test_a_chat_template_prompt_assigns_roles_from_the_end(tmp_path):
    folder = save_general_model(tmp_path / "chat", TEMPLATE)
    dm, prompt = load_model("chat", str(folder), AuditModel(path=str(folder)), "cpu")
    assert prompt == PromptFormat("chat_template")
    tok = dm.tokenizer
    [ids] = encode_prompts(dm, [Source(["hi there", "hello", "how are you?"], persona=["ignored"])],
                           GenerateConfig(), prompt)
    expected = "<user>hi there<|endoftext|><assistant>hello<|endoftext|><user>how are you?<|endoftext|><assistant>"
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_without_a_template_a_causal_model_is_prompted_eos_separated(tmp_path):
    folder = save_general_model(tmp_path / "plain")
    dm, prompt = load_model("plain", str(folder), AuditModel(path=str(folder)), "cpu")
    assert prompt == PromptFormat("eos_separated")
    tok, eos = dm.tokenizer, dm.tokenizer.eos_token_id
    [ids] = encode_prompts(dm, [Source(["hi there", "how are you?"])], GenerateConfig(), prompt)
    words = tok(["hi there", "how are you?"], add_special_tokens=False)["input_ids"]
    assert ids == words[0] + [eos] + words[1] + [eos]  # DialoGPT's format: each turn ends in eos
    # too long: whole oldest turns go first; a last turn alone too long keeps the prompt's end
    assert native_prompt(dm, ["hi there", "how are you?"], prompt, len(words[1]) + 1) == words[1] + [eos]
    assert native_prompt(dm, ["hi there", "how are you?"], prompt, 3) == (words[1] + [eos])[-3:]


@pytest.mark.parametrize("with_template", [True, False])
def test_an_audited_model_gets_no_tokens_and_writes_plain_replies(tmp_path, with_template):
    from transformers import AutoTokenizer

    folder = save_general_model(tmp_path / "general", TEMPLATE if with_template else None)
    vocabulary = len(AutoTokenizer.from_pretrained(folder))
    dm, prompt = load_model("general", str(folder), AuditModel(path=str(folder)), "cpu")
    assert len(dm.tokenizer) == vocabulary and dm.model.get_input_embeddings().num_embeddings == vocabulary
    assert all(marker not in dm.tokenizer.get_vocab() for marker in (ROT, RESPONSE, USER, BOT))
    assert prompt.native and dm.tokenizer.pad_token_id is None  # nothing added, not even a pad
    sources = [Source(["hello there"]), Source(["hi", "how are you?"])]
    sampled = sample_candidates(dm, sources, GenerateConfig(k=3, max_new_tokens=8), seed=0, prompt=prompt)
    assert sampled.rots == [None] * 6
    config = GenerateConfig(k=3, max_new_tokens=8)
    target_ids, _ = generate_batch(dm, encode_prompts(dm, sources, config, prompt), config, seed=0)  # the same samples
    assert sampled.responses == [" ".join(dm.tokenizer.decode(t, skip_special_tokens=True).split()) for t in target_ids]


def test_the_format_setting_is_checked_against_the_tokenizer():
    plain = plain_tokenizer()
    assert resolve_format(" <turn> ", plain, True, "k") == PromptFormat("separator", " <turn> ")
    assert resolve_format("eos_separated", plain, True, "k") == PromptFormat("eos_separated")
    with pytest.raises(DataError, match="audit.models.x.format = 'auto'.*separator"):
        resolve_format("auto", plain, True, "audit.models.x.format")  # seq2seq, no template: name it
    with pytest.raises(DataError, match="audit.models.x.format = 'chat_template'.*no chat template"):
        resolve_format("chat_template", plain, False, "audit.models.x.format")
    assert resolve_format("auto", plain_tokenizer(TEMPLATE), True, "k") == PromptFormat("chat_template")


def test_a_literal_separator_joins_the_turns_of_a_seq2seq_model():
    """COSMO-style: `turn1 <turn> turn2`, with the tokenizer's own special tokens (its eos)."""
    from transformers import BartConfig, BartForConditionalGeneration

    tok = plain_tokenizer()
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id))
    dm = DialogModel(model.eval(), tok, True)
    prompt = PromptFormat("separator", " <turn> ")
    [ids] = encode_prompts(dm, [Source(["hi there", "how are you?"])], GenerateConfig(), prompt)
    assert ids == tok("hi there <turn> how are you?")["input_ids"]
    sampled = sample_candidates(dm, [Source(["hi there"])], GenerateConfig(k=2, max_new_tokens=5), seed=0, prompt=prompt)
    assert sampled.rots == [None, None] and len(sampled.responses) == 2


# --- the worker, with candidates fixed by hand ----------------------------------------------------

FIXED = ["<|rot|> Be kind. <|response|> you are right", "<|response|> no", "<|rot|> It is wrong to lie and"]
FIXED_LOGP = [math.log(0.5), math.log(0.9), -math.inf]  # the last has no reply tokens


def fixed_sampler(dm, sources, config, seed, **options):
    texts = [FIXED[j % 3] for _ in sources for j in range(config.k)]
    parsed = [split_candidate(t) for t in texts]
    fluency = np.array([FIXED_LOGP[j % 3] for _ in sources for j in range(config.k)])
    return Sampled(texts, [p[0] for p in parsed], [p[1] for p in parsed], fluency, tokens=5 * len(texts))


@pytest.mark.parametrize("rerank", [True, False])
def test_the_table_holds_every_candidate_with_hand_checked_scores(monkeypatch, rerank):
    from conftest import FakeSafetyScorer

    monkeypatch.setattr(generate, "sample_candidates", fixed_sampler)
    rows = [normalized_row("prosocial_dialog", i, safety_label="__casual__", rots=["r"]) for i in range(3)]
    rows.append(normalized_row("prosocial_dialog", 0, turn_index=5, response="second answer", rots=["r"]))  # d0 again
    config = GenerateConfig(k=3, batch_size=2, rerank=rerank, alpha=1.0, beta=2.0)
    table, stats = candidates_table(None, FakeSafetyScorer(), rows, "stage2", "prosocial_dialog", config, progress=False)
    assert table.schema == CANDIDATES and table.num_rows == 9
    data = table.to_pydict()
    assert data["context_id"][:3] == ["prosocial_dialog/d0/1"] * 3 and data["candidate_index"][:3] == [0, 1, 2]
    assert data["rot"][:3] == ["Be kind.", None, "It is wrong to lie and"]
    assert data["response"][:3] == ["you are right", "no", ""]
    assert data["reference"][0] == "i am fine, thanks for asking." and data["reference_rots"][0] == ["r"]
    assert data["references"][0] == ["i am fine, thanks for asking.", "second answer"]
    assert data["references"][3] == ["i am fine, thanks for asking."]
    # prosociality: 3 words -> 1/4, 1 word -> 1/2, empty -> 0; score = exp(logp) + 2 * prosociality
    assert data["prosociality"][:3] == pytest.approx([0.25, 0.5, 0.0])
    assert data["score"][:3] == pytest.approx([0.5 + 0.5, 0.9 + 1.0, 0.0 + 0.0])
    assert data["fluency"][:3] == pytest.approx(FIXED_LOGP)
    assert data["safety_probs"][2] == pytest.approx([1.0, 0.0, 0.0])
    if rerank:
        assert data["rank"][:3] == [2, 1, 3] and data["selected"][:3] == [False, True, False]
        assert stats["selected_not_first"] == 3
    else:
        assert data["rank"][:3] == [1, 2, 3] and data["selected"][:3] == [True, False, False]
        assert stats["selected_not_first"] == 0
    assert stats["with_rot"] == 6 and stats["empty_responses"] == 3 and stats["candidates"] == 9
    assert stats["test_rows"] == 4 and stats["distinct_contexts"] == 3 and stats["contexts"] == 3
    assert stats["no_reply_tokens"] == 3


# --- the command ----------------------------------------------------------------------------------


def run_generate(tmp_path, model_dir, normalized_dir, name="stage2", out="out", section=None, audit=None):
    params = write_params(tmp_path / "params.yaml", section or SMALL, audit)
    return invoke("generate", name, "--model", model_dir, "--safety", tmp_path / "safety", "--normalized",
                  normalized_dir, "--out", tmp_path / out, "--params", params)


def test_generate_writes_every_corpus_and_is_deterministic(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                          fake_safety_scorer):
    # MIC: three annotators' answers to one question, and two other questions
    mic = [normalized_row("mic", 0, dialogue_id="q", turn_index=i, context=["can i lie?"], response=f"answer {i}")
           for i in range(3)] + [normalized_row("mic", i) for i in (1, 2)]
    write_split(normalized_dir, "mic", mic)
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir)
    assert result.exit_code == 0, result.output
    for corpus in CORPORA:
        table = pq.read_table(tmp_path / "out" / f"{corpus}.parquet")
        assert table.schema.remove_metadata() == CANDIDATES
        assert table.num_rows == 3 * 2  # max_contexts * k
        data = table.to_pydict()
        assert set(data["model"]) == {"stage2"} and set(data["corpus"]) == {corpus}
        # agreement is null: no RoT-agreement scorer (generate.gamma is 0 here; see tests/test_rot_agreement.py)
        assert all(v is not None for column, values in data.items()
                   if column not in ("rot", "safety_label", "category", "agreement") for v in values)
        assert set(data["category"]) == ({"Risk Ignorance"} if corpus == "diasafety" else {None})
        assert set(data["agreement"]) == {None}
        for context in set(data["context_id"]):
            rows = [i for i, c in enumerate(data["context_id"]) if c == context]
            assert sorted(data["candidate_index"][i] for i in rows) == [0, 1]
            assert sorted(data["rank"][i] for i in rows) == [1, 2]
            assert [data["selected"][i] for i in rows].count(True) == 1
    persona = pq.read_table(tmp_path / "out" / "persona_chat.parquet").to_pydict()
    assert persona["safety_label"] == [None] * 6
    mic = pq.read_table(tmp_path / "out" / "mic.parquet").to_pydict()
    assert sorted(set(mic["context_id"])) == ["mic/d1/1", "mic/d2/1", "mic/q/0"]  # the question once
    assert mic["references"][mic["context_id"].index("mic/q/0")] == ["answer 0", "answer 1", "answer 2"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["corpora"]["mic"]["contexts"] == 3 and stats["corpora"]["mic"]["test_rows"] == 5
    assert stats["corpora"]["mic"]["distinct_contexts"] == 3
    assert stats["corpora"]["daily_dialog"]["contexts"] == 3 and stats["corpora"]["daily_dialog"]["distinct_contexts"] == 5
    assert stats["prompt_format"] == "markers" and stats["precision"] == "fp32"
    assert stats["decoding"]["min_length"] == 0 and stats["decoding"]["top_p"] == 0.9
    assert stats["decoding"]["max_new_tokens"] == 6 and stats["decoding"]["num_return_sequences"] == 2
    assert stats["sampler"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "width": 256}
    # same seed, same candidates, byte for byte
    again = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, out="again")
    assert again.exit_code == 0, again.output
    for corpus in CORPORA:
        assert (tmp_path / "out" / f"{corpus}.parquet").read_bytes() == (tmp_path / "again" / f"{corpus}.parquet").read_bytes()


def test_an_audit_model_is_prompted_in_its_own_format(tmp_path, normalized_dir, fake_safety_scorer):
    """A general-purpose checkpoint (a local one whose tokenizer has a chat template and no markers)."""
    folder = save_general_model(tmp_path / "general", TEMPLATE)
    audit = {"general": {"path": str(folder)}}
    result = run_generate(tmp_path, folder, normalized_dir, name="general", audit=audit)
    assert result.exit_code == 0, result.output
    data = pq.read_table(tmp_path / "out" / "mic.parquet").to_pydict()
    assert len(data["text"]) == 6 and set(data["model"]) == {"general"} and set(data["rot"]) == {None}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["prompt_format"] == "chat_template" and stats["audit"]["format"] == "auto"
    assert stats["decoding"]["pad_token_id"] == stats["decoding"]["eos_token_id"]  # no pad of its own


def test_an_audit_model_with_its_own_code_is_refused_unless_trusted(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                                   fake_safety_scorer):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_dialog_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    result = run_generate(tmp_path, folder, normalized_dir, name="remote", audit={"remote": {"path": str(folder)}})
    assert_one_line_error(result, "audit.models.remote.trust_remote_code")


def test_an_audit_format_the_tokenizer_cannot_serve_is_a_one_line_error(tmp_path, normalized_dir, fake_safety_scorer):
    folder = save_general_model(tmp_path / "general")
    audit = {"general": {"path": str(folder), "format": "chat_template"}}
    result = run_generate(tmp_path, folder, normalized_dir, name="general", audit=audit)
    assert_one_line_error(result, "audit.models.general.format = 'chat_template'", "no chat template")


# --- bad input ------------------------------------------------------------------------------------


def test_a_model_folder_without_a_tokenizer_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                                fake_safety_scorer):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_dialog_model_dir, folder)
    (folder / "tokenizer_config.json").unlink()
    assert_one_line_error(run_generate(tmp_path, folder, normalized_dir), "no_tokenizer", "no tokenizer")


def test_an_empty_test_split_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir, fake_safety_scorer):
    path = normalized_dir / "daily_dialog" / "test.parquet"
    pq.write_table(NORMALIZED.empty_table(), path)
    assert_one_line_error(run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir), str(path), "no rows")
    assert not (tmp_path / "out").exists()


def test_a_missing_test_split_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir, fake_safety_scorer):
    (normalized_dir / "mic" / "test.parquet").unlink()
    assert_one_line_error(run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir), "mic", "not found")


@pytest.mark.parametrize("section, parts", [
    ({**SMALL, "k": 0}, ("generate.k", "at least 1")),
    ({**SMALL, "do_sample": False}, ("generate.k", "do_sample")),
    ({**SMALL, "top_p": 0}, ("generate.top_p",)),
    ({**SMALL, "beam": 4}, ("generate.beam",)),
    ({**SMALL, "precision": "fp8"}, ("generate.precision",)),
])
def test_bad_generate_parameters_are_one_line_config_errors(tmp_path, tiny_dialog_model_dir, normalized_dir, section,
                                                            parts):
    assert_one_line_error(run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, section=section), *parts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_without_a_gpu_is_a_one_line_config_error(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                       fake_safety_scorer):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, section={**SMALL, "precision": "fp16"})
    assert_one_line_error(result, "generate.precision = 'fp16'", "needs a GPU")


def test_an_unknown_model_entry_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, name="stage3")
    assert_one_line_error(result, "'stage3'", "base, ce, stage1, stage2", "audit.models")


def test_an_audit_name_that_shadows_a_trained_model_is_refused(tmp_path, tiny_dialog_model_dir, normalized_dir):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, audit={"base": {"path": "x"}})
    assert_one_line_error(result, "audit.models.base")


def test_an_empty_audit_format_is_refused(tmp_path, tiny_dialog_model_dir, normalized_dir):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, audit={"x": {"path": "x", "format": ""}})
    assert_one_line_error(result, "audit.models.<name>.format")


def test_the_repository_params_and_stages(repo_root):
    """The default run stays small and audits nothing beyond base; the paper's audited models name their
    formats; the DVC stages (their code deps: tests/test_dvc_deps.py)."""
    import yaml

    from pipeline.config import AuditConfig, load_section

    config = load_section(repo_root / "params.yaml", "generate", GenerateConfig)
    assert config.max_contexts <= 8 and config.k <= 4 and config.max_new_tokens <= 32 and config.rerank
    assert load_section(repo_root / "params.yaml", "audit", AuditConfig).models == {}
    paper = load_section(repo_root / "params.paper.yaml", "audit", AuditConfig).models
    assert paper["dialogpt"].format == "eos_separated" and paper["cosmo"].format == " <turn> "
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    stage = stages["generate"]
    assert stage["foreach"] == ["base", "ce", "stage1", "stage2"]
    for path in ("models/${item}", "models/safety", *(f"data/normalized/{c}/test.parquet" for c in CORPORA)):
        assert path in stage["do"]["deps"]
    assert stage["do"]["params"] == ["generate"] and stage["do"]["outs"] == ["data/candidates/${item}"]
    assert stages["audit"]["foreach"] == "${audit.models}"


def test_help():
    for command in ("generate", "chat"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--safety" in result.output
