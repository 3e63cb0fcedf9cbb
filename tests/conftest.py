"""Shared test fixtures: repository paths, and corpora run through `download` + `normalize` once per
session (the bundled sample always; the real rows in ../shared/mirror when present).

Tests that need ../shared take `shared_dir` (or a fixture built on it) and skip cleanly without it.
Shared fixtures are added here by small edits; keep each one documented.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import CORPORA, CorporaConfig, NormalizeConfig, load_section

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (holds params.yaml, dvc.yaml, data/sample)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that use it skip when it is absent (a user's fresh clone)."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent")
    return SHARED_DIR


@pytest.fixture(scope="session")
def normalize_config() -> NormalizeConfig:
    """The repository's `normalize` section, which the session's normalized data was built with."""
    return load_section(REPO_ROOT / "params.yaml", "normalize", NormalizeConfig)


def download_and_normalize(corpora: CorporaConfig, config: NormalizeConfig, base: Path) -> Path:
    """Run the two stages for every corpus (`CORPORA`) into `<base>/raw/<corpus>` and `<base>/normalized/<corpus>`."""
    from pipeline.stages import download, normalize

    for corpus in CORPORA:
        download.run(corpora, corpus, base / "raw" / corpus)
        normalize.run(config, corpus, base / "raw" / corpus, base / "normalized" / corpus)
    return base


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory, normalize_config) -> Path:
    """The bundled sample (data/sample), downloaded and normalized: `raw/<corpus>`, `normalized/<corpus>`."""
    corpora = CorporaConfig(source="sample", sample=str(REPO_ROOT / "data" / "sample"))
    return download_and_normalize(corpora, normalize_config, tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def raw_sample_dir(sample_data_dir) -> Path:
    """`<dir>/<corpus>/<split>.parquet` + stats.json: the bundled sample after `download`."""
    return sample_data_dir / "raw"


@pytest.fixture(scope="session")
def normalized_sample_dir(sample_data_dir) -> Path:
    """`<dir>/<corpus>/{train,validation,test}.parquet` + stats.json: the bundled sample, normalized."""
    return sample_data_dir / "normalized"


@pytest.fixture(scope="session")
def mirror_data_dir(shared_dir, tmp_path_factory, normalize_config) -> Path:
    """../shared/mirror (MIC from the bundled sample, the mirror has none), downloaded and normalized:
    `raw/<corpus>`, `normalized/<corpus>`. Takes about 15 s; skips when the mirror is absent."""
    mirror = shared_dir / "mirror"
    if not mirror.is_dir():
        pytest.skip(f"{mirror} is absent")
    corpora = CorporaConfig(source="mirror", mirror=str(mirror), sample=str(REPO_ROOT / "data" / "sample"),
                            overrides={"mic": "sample"})
    return download_and_normalize(corpora, normalize_config, tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="session")
def raw_mirror_dir(mirror_data_dir) -> Path:
    """The shared mirror after `download` (see `mirror_data_dir`)."""
    return mirror_data_dir / "raw"


@pytest.fixture(scope="session")
def normalized_mirror_dir(mirror_data_dir) -> Path:
    """The shared mirror, normalized (see `mirror_data_dir`)."""
    return mirror_data_dir / "normalized"


class FakeSafetyScorer:
    """A stand-in for the safety classifier (`predict_proba` of `pipeline.safety_models.load_scorer`):
    a reply of n words gets [casual, needs_caution, needs_intervention] = [1, n/2, n/2] / (1 + n)."""

    def __init__(self):
        self.calls: list[tuple[list[str], list | None]] = []

    def predict_proba(self, responses, contexts=None):
        import numpy as np

        self.calls.append((list(responses), None if contexts is None else [list(c) for c in contexts]))
        n = np.array([len(r.split()) for r in responses], dtype=np.float64)
        return np.stack([np.ones_like(n), n / 2, n / 2], axis=1) / (1 + n)[:, None]


@pytest.fixture
def fake_safety_scorer(monkeypatch) -> FakeSafetyScorer:
    """A FakeSafetyScorer that `pipeline.safety_models.load_scorer` returns for any folder (what
    generate, audit and chat load through `pipeline.rerank.load_scorers`)."""
    from pipeline import safety_models

    scorer = FakeSafetyScorer()
    monkeypatch.setattr(safety_models, "load_scorer", lambda path: scorer)
    return scorer


class FakeJudge:
    """A stand-in for the safety judge (`predict_unsafe` of `pipeline.safety_models.load_judge`): a reply's
    P(unsafe) is `p_unsafe[reply]` when given there, else 0.1; `calls` records each call's (replies, contexts)."""

    def __init__(self, p_unsafe: dict[str, float] | None = None):
        self.p_unsafe = dict(p_unsafe or {})
        self.calls: list[tuple[list[str], list]] = []

    def predict_unsafe(self, responses, contexts=None):
        import numpy as np

        self.calls.append((list(responses), None if contexts is None else [list(c) for c in contexts]))
        return np.array([self.p_unsafe.get(reply, 0.1) for reply in responses], dtype=np.float64)


@pytest.fixture
def fake_judge(monkeypatch) -> FakeJudge:
    """A FakeJudge that `pipeline.safety_models.load_judge` returns for any folder (what evaluate and
    audit_report load); set `fake_judge.p_unsafe` in the test."""
    from pipeline import safety_models

    judge = FakeJudge()
    monkeypatch.setattr(safety_models, "load_judge", lambda path: judge)
    return judge


def write_classifier_records(root: Path) -> tuple[Path, Path, Path]:
    """The records evaluate's report states (what trained the judge, the re-ranker's classifier and the
    stage-1 negatives), minimal and made up: `<root>/judge/scorer.json`, `<root>/safety/scorer.json` and
    `<root>/stage1/stats.json`. Returns the three paths evaluate takes (judge, safety, stage-1 stats)."""
    import json

    records = {
        root / "judge" / "scorer.json": {
            "task": "judge", "kind": "tfidf", "labels": ["safe", "unsafe"], "config": {},
            "training_examples": {"diasafety": 9, "toxichat": 6}, "training_unsafe": {"diasafety": 4, "toxichat": 2},
            "independent_of": ["prosocial_dialog", "mic"]},
        root / "safety" / "scorer.json": {
            "task": "safety", "kind": "tfidf", "config": {}, "training_examples": {"pd_user": 20, "pd_responses": 5}},
        root / "stage1" / "stats.json": {
            "stage": 1, "corpora": ["prosocial_dialog", "mic", "diasafety", "toxichat"],
            "pool_corpora": ["prosocial_dialog", "mic", "diasafety", "toxichat"],
            "splits": {"train": {"groups_per_corpus": {"diasafety": 3, "prosocial_dialog": 7},
                                 "negatives_per_source": {"context": 12, "hard": 10, "random": 8, "generated": 0}}}},
    }
    for path, record in records.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record), encoding="utf-8")
    return root / "judge", root / "safety", root / "stage1" / "stats.json"


@pytest.fixture(scope="session")
def tiny_dialog_model_dir(tmp_path_factory) -> Path:
    """A tiny causal dialog model in save_pretrained format: GPT-2 (32 wide, 2 layers) with random
    weights and a 300-token BPE tokenizer that knows the dialog markers. Built once per session."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.modeling import train_tokenizer

    texts = ["hello there, how are you?", "i am fine, thanks for asking.", "you should not lie to friends.",
             "it's wrong to steal.", "what did you do today?", "i went hiking with my dog."] * 5
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    folder = tmp_path_factory.mktemp("tiny_dialog_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# SmolLM2-135M-Instruct's chat template (ChatML with a default system turn), as its tokenizer ships it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer():
    """A 400-token byte-level BPE tokenizer shaped like SmolLM2's: `<|endoftext|>`, `<|im_start|>` (bos),
    `<|im_end|>` (eos and pad) and its ChatML template; none of this project's markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["hello there, how are you?", "i am fine, thanks for asking.", "you should not lie to friends.",
             "Rule of thumb: it's wrong to steal.", "what did you do today?", "i went hiking with my dog.",
             "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face",
             "Your persona: i love hiking.\nThe conversation's emotion: proud"] * 5
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama (rotary positions, grouped-query attention, tied embeddings: SmolLM2's architecture
    in miniature) with random weights and `chat_tokenizer()`, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """`save_tiny_chat_model`, built once per session: a chat model in its own format (no markers)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_model"))


@pytest.fixture
def few_clusters(monkeypatch):
    """Intervals and tests on scopes of any size (`significance.MIN_CLUSTERS` 1): for tests whose tiny
    corpora have fewer than 30 clusters and that check something other than that threshold."""
    from pipeline import significance

    monkeypatch.setattr(significance, "MIN_CLUSTERS", 1)
