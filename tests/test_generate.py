"""The generate stage: sampling in batches, parsing, scoring, the written candidates, audit models and
bad input. Models are tiny and random (conftest's `tiny_dialog_model_dir`); the safety classifier is
conftest's FakeSafetyScorer, so every score can be checked by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CORPORA, GenerateConfig
from pipeline.modeling import BOT, DialogModel, Source, encode_sources, load_dialog_model
from pipeline.schemas import CANDIDATES, NORMALIZED
from pipeline.stages import generate
from pipeline.sampling import Sampled, batch_seed, decode_target, mean_logprobs, sample_batch, split_candidate
from pipeline.stages.generate import candidates_table, safety_scores, select_contexts

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


@pytest.fixture
def normalized_dir(tmp_path) -> Path:
    """Five test rows per corpus; ProsocialDialog rows carry labels and RoTs, PersonaChat a persona,
    EmpatheticDialogues an emotion."""
    extra = {"prosocial_dialog": {"safety_label": "__needs_caution__", "rots": ["you should not lie to friends."]},
             "persona_chat": {"persona": ["i went hiking with my dog."]},
             "empathetic_dialogues": {"emotion": "proud"}}
    for corpus in CORPORA:
        rows = [normalized_row(corpus, i, **extra.get(corpus, {})) for i in range(5)]
        (tmp_path / "normalized" / corpus).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=NORMALIZED), tmp_path / "normalized" / corpus / "test.parquet")
    return tmp_path / "normalized"


@pytest.fixture(scope="module")
def dm(tiny_dialog_model_dir) -> DialogModel:
    model = load_dialog_model(tiny_dialog_model_dir)
    model.model.eval()
    return model


# --- pieces ---------------------------------------------------------------------------------------


def test_contexts_are_drawn_with_the_seed_in_file_order():
    rows = [{"i": i} for i in range(10)]
    chosen = select_contexts(rows, "mic", 4, seed=0)
    assert len(chosen) == 4 and [r["i"] for r in chosen] == sorted(r["i"] for r in chosen)
    assert chosen == select_contexts(rows, "mic", 4, seed=0)
    assert any(select_contexts(rows, "mic", 4, seed=s) != chosen for s in range(1, 5))
    assert select_contexts(rows, "mic", 0, seed=0) == rows  # 0: all
    assert select_contexts(rows[:3], "mic", 4, seed=0) == rows[:3]


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
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)).eval()
    sources = encode_sources(tok, [Source(["hi"]), Source(["what did you do today?", "i went hiking.", "nice!"]),
                                   Source(["you should not lie"])], 64)
    greedy = GenerateConfig(k=1, do_sample=False, max_new_tokens=10)
    for model in (dm, DialogModel(bart, tok, True)):
        batched = sample_batch(model, sources, greedy, seed=0)
        single = [sample_batch(model, [source], greedy, seed=0)[0] for source in sources]
        assert batched == single
        assert len({tuple(t) for t in batched}) > 1  # the contexts really differ


def test_sampling_is_reproducible_gives_k_per_source_and_cuts_at_eos(dm):
    sources = encode_sources(dm.tokenizer, [Source(["hi"]), Source(["what did you do today?"])], 64)
    config = GenerateConfig(k=3, max_new_tokens=6)
    first = sample_batch(dm, sources, config, seed=7)
    assert first == sample_batch(dm, sources, config, seed=7)
    assert first != sample_batch(dm, sources, config, seed=8)
    assert len(first) == 6
    eos = dm.tokenizer.eos_token_id
    for target in first:
        assert eos not in target[:-1] and (target[-1] == eos or len(target) == 6)


def test_fluency_is_the_mean_log_probability_of_the_generated_tokens(dm):
    """Checked against a plain forward pass over `source <|bot|> target` for each candidate alone."""
    sources = encode_sources(dm.tokenizer, [Source(["hi"]), Source(["what did you do today?"])], 64)
    targets = sample_batch(dm, sources, GenerateConfig(k=2, max_new_tokens=6), seed=3)
    got = mean_logprobs(dm, sources, targets, k=2)
    bot = dm.tokenizer.convert_tokens_to_ids(BOT)
    for row, target in enumerate(targets):
        prefix = sources[row // 2] + [bot]
        with torch.no_grad():
            logits = dm.model(input_ids=torch.tensor([prefix + target])).logits[0]
        logps = torch.log_softmax(logits[len(prefix) - 1: len(prefix) - 1 + len(target)], -1)
        expected = logps.gather(-1, torch.tensor(target).unsqueeze(-1)).mean().item()
        assert got[row] == pytest.approx(expected, abs=1e-5)


def test_an_empty_reply_keeps_its_safety_probabilities_but_has_no_prosociality():
    from conftest import FakeSafetyScorer

    scorer = FakeSafetyScorer()
    probs, prosociality = safety_scores(scorer, ["you are right", "", "  "], [["a"], ["b"], ["c"]])
    # 3 words: [1, 1.5, 1.5] / 4; no words: [1, 0, 0]
    assert probs == pytest.approx(np.array([[0.25, 0.375, 0.375], [1, 0, 0], [1, 0, 0]]))
    assert prosociality.tolist() == pytest.approx([0.25, 0.0, 0.0])
    assert scorer.calls[0][1] == [["a"], ["b"], ["c"]]  # replies are classified in their context


# --- the worker, with candidates fixed by hand ----------------------------------------------------

FIXED = ["<|rot|> Be kind. <|response|> you are right", "<|response|> no", "<|rot|> It is wrong to lie and"]
FIXED_LOGP = [math.log(0.5), math.log(0.9), math.log(0.8)]


def fixed_sampler(dm, sources, config, seed):
    texts = [FIXED[j % 3] for _ in sources for j in range(config.k)]
    parsed = [split_candidate(t) for t in texts]
    fluency = np.array([FIXED_LOGP[j % 3] for _ in sources for j in range(config.k)])
    return Sampled(texts, [p[0] for p in parsed], [p[1] for p in parsed], fluency, tokens=5 * len(texts))


@pytest.mark.parametrize("rerank", [True, False])
def test_the_table_holds_every_candidate_with_hand_checked_scores(monkeypatch, rerank):
    from conftest import FakeSafetyScorer

    monkeypatch.setattr(generate, "sample_candidates", fixed_sampler)
    rows = [normalized_row("prosocial_dialog", i, safety_label="__casual__", rots=["r"]) for i in range(3)]
    config = GenerateConfig(k=3, batch_size=2, rerank=rerank, alpha=1.0, beta=2.0)
    table, stats = candidates_table(None, FakeSafetyScorer(), rows, "stage2", "prosocial_dialog", config, progress=False)
    assert table.schema == CANDIDATES and table.num_rows == 9
    data = table.to_pydict()
    assert data["context_id"][:3] == ["prosocial_dialog/d0/1"] * 3 and data["candidate_index"][:3] == [0, 1, 2]
    assert data["rot"][:3] == ["Be kind.", None, "It is wrong to lie and"]
    assert data["response"][:3] == ["you are right", "no", ""]
    assert data["reference"][0] == "i am fine, thanks for asking." and data["reference_rots"][0] == ["r"]
    # prosociality: 3 words -> 1/4, 1 word -> 1/2, empty -> 0; score = exp(logp) + 2 * prosociality
    assert data["prosociality"][:3] == pytest.approx([0.25, 0.5, 0.0])
    assert data["score"][:3] == pytest.approx([0.5 + 0.5, 0.9 + 1.0, 0.8 + 0.0])
    assert data["fluency"][:3] == pytest.approx(FIXED_LOGP)
    assert data["safety_probs"][2] == pytest.approx([1.0, 0.0, 0.0])
    if rerank:
        assert data["rank"][:3] == [2, 1, 3] and data["selected"][:3] == [False, True, False]
        assert stats["selected_not_first"] == 3
    else:
        assert data["rank"][:3] == [1, 2, 3] and data["selected"][:3] == [True, False, False]
        assert stats["selected_not_first"] == 0
    assert stats["with_rot"] == 6 and stats["empty_responses"] == 3 and stats["candidates"] == 9


# --- the command ----------------------------------------------------------------------------------


def run_generate(tmp_path, model_dir, normalized_dir, name="stage2", out="out", section=None, audit=None):
    params = write_params(tmp_path / "params.yaml", section or SMALL, audit)
    return invoke("generate", name, "--model", model_dir, "--safety", tmp_path / "safety", "--normalized",
                  normalized_dir, "--out", tmp_path / out, "--params", params)


def test_generate_writes_every_corpus_and_is_deterministic(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                          fake_safety_scorer):
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
                   if column not in ("rot", "safety_label", "agreement") for v in values)
        assert set(data["agreement"]) == {None}
        for context in set(data["context_id"]):
            rows = [i for i, c in enumerate(data["context_id"]) if c == context]
            assert sorted(data["candidate_index"][i] for i in rows) == [0, 1]
            assert sorted(data["rank"][i] for i in rows) == [1, 2]
            assert [data["selected"][i] for i in rows].count(True) == 1
    persona = pq.read_table(tmp_path / "out" / "persona_chat.parquet").to_pydict()
    assert persona["safety_label"] == [None] * 6
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["corpora"]["mic"]["contexts"] == 3 and stats["corpora"]["mic"]["test_rows"] == 5
    # same seed, same candidates, byte for byte
    again = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, out="again")
    assert again.exit_code == 0, again.output
    for corpus in CORPORA:
        assert (tmp_path / "out" / f"{corpus}.parquet").read_bytes() == (tmp_path / "again" / f"{corpus}.parquet").read_bytes()


def test_an_audit_model_without_the_markers_gets_them_added(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                           fake_safety_scorer):
    """A general-purpose checkpoint (here a local one whose tokenizer lacks the dialog markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello there, how are you?", "i am fine."] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    folder = tmp_path / "general"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    audit = {"general": {"path": str(folder)}}
    result = run_generate(tmp_path, folder, normalized_dir, name="general", audit=audit)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "mic.parquet")
    assert table.num_rows == 6 and set(table.column("model").to_pylist()) == {"general"}


def test_an_audit_model_with_its_own_code_is_refused_unless_trusted(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                                   fake_safety_scorer):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny_dialog_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    result = run_generate(tmp_path, folder, normalized_dir, name="remote", audit={"remote": {"path": str(folder)}})
    assert_one_line_error(result, "audit.models.remote.trust_remote_code")


# --- bad input ------------------------------------------------------------------------------------


def test_a_model_folder_without_a_tokenizer_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir,
                                                                fake_safety_scorer):
    import shutil

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
])
def test_bad_generate_parameters_are_one_line_config_errors(tmp_path, tiny_dialog_model_dir, normalized_dir, section,
                                                            parts):
    assert_one_line_error(run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, section=section), *parts)


def test_an_unknown_model_entry_is_a_one_line_error(tmp_path, tiny_dialog_model_dir, normalized_dir):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, name="stage3")
    assert_one_line_error(result, "'stage3'", "base, stage1, stage2", "audit.models")


def test_an_audit_name_that_shadows_a_trained_model_is_refused(tmp_path, tiny_dialog_model_dir, normalized_dir):
    result = run_generate(tmp_path, tiny_dialog_model_dir, normalized_dir, audit={"base": {"path": "x"}})
    assert_one_line_error(result, "audit.models.base")


def test_the_repository_params_and_stages(repo_root):
    """The default run stays small, audits nothing beyond base, and the DVC stages name what they read."""
    import yaml

    from pipeline.config import AuditConfig, load_section

    config = load_section(repo_root / "params.yaml", "generate", GenerateConfig)
    assert config.max_contexts <= 8 and config.k <= 4 and config.max_new_tokens <= 32 and config.rerank
    assert load_section(repo_root / "params.yaml", "audit", AuditConfig).models == {}
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    stage = stages["generate"]
    assert stage["foreach"] == ["base", "stage1", "stage2"]
    for path in ("pipeline/stages/generate.py", "pipeline/rerank.py", "pipeline/modeling.py", "models/${item}",
                 "models/safety", *(f"data/normalized/{c}/test.parquet" for c in CORPORA)):
        assert path in stage["do"]["deps"]
    assert stage["do"]["params"] == ["generate"] and stage["do"]["outs"] == ["data/candidates/${item}"]
    assert stages["audit"]["foreach"] == "${audit.models}"


def test_help():
    for command in ("generate", "chat"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--safety" in result.output
