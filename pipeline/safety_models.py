"""The three kinds of safety classifier behind one API, with safe (pickle-free) saving and loading.

Every kind predicts ProsocialDialog's five safety labels (`LABELS5`); the three-way probabilities
(`THREE_WAY`) are sums of the five. A scorer classifies an utterance given the turns before it:

    scorer.predict_proba5(responses, contexts=None)  # (n, 5), rows sum to 1, columns LABELS5
    scorer.predict_proba(responses, contexts=None)   # (n, 3), rows sum to 1, columns THREE_WAY

Kinds (`safety.model`):
- `tfidf`: word n-gram TF-IDF + multinomial logistic regression. With context, the last
  `context_turns` turns form a second TF-IDF block (same vocabulary, own coefficients). Saved as
  `tfidf.npz` (terms, idf, coef, intercept), loaded with `np.load(allow_pickle=False)`.
- `scratch`: a small BERT encoder built from a config, with a WordPiece tokenizer trained on the
  training text. `hf`: any Hugging Face encoder (name or local path) through
  `AutoModelForSequenceClassification`. Both read the context as a second segment
  (`[CLS] response [SEP] context [SEP]`) and are saved with `save_pretrained` (safetensors) in
  `encoder/`.

The folder's `scorer.json` names the kind and carries the resolved config, the git commit and the
library versions; `load_scorer` reads it first. torch and transformers are imported only by the
transformer kinds, so loading a TF-IDF scorer stays light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError
from pipeline.stages.normalize import SAFETY_LABELS as LABELS5

log = logging.getLogger(__name__)

THREE_WAY = ("casual", "needs_caution", "needs_intervention")
COLLAPSE = {  # five-way label -> three-way label
    "__casual__": "casual",
    "__possibly_needs_caution__": "needs_caution",
    "__probably_needs_caution__": "needs_caution",
    "__needs_caution__": "needs_caution",
    "__needs_intervention__": "needs_intervention",
}
# COLLAPSE_MATRIX[i, j] = 1 when five-way label i collapses to three-way label j; (5, 3)
COLLAPSE_MATRIX = np.array([[THREE_WAY.index(COLLAPSE[label]) == j for j in range(3)] for label in LABELS5],
                           dtype=np.float64)
KINDS = ("tfidf", "scratch", "hf")
SCORER_FILE = "scorer.json"
ENCODER_DIR = "encoder"
TFIDF_FILE = "tfidf.npz"


def collapse_proba(probs5: np.ndarray) -> np.ndarray:
    """Three-way probabilities from five-way ones by summing the caution columns; (n, 5) -> (n, 3)."""
    return np.asarray(probs5, dtype=np.float64) @ COLLAPSE_MATRIX


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits; (n, k) -> (n, k)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def context_texts(contexts: Sequence[Sequence[str] | None] | None, n: int, turns: int) -> list[str] | None:
    """The last `turns` turns of each context joined by newlines ('' for none); None when unused."""
    if turns == 0:
        return None
    if contexts is None:
        return [""] * n
    return ["\n".join(list(context)[-turns:]) if context is not None and len(context) else "" for context in contexts]


def check_inputs(responses, contexts) -> None:
    if isinstance(responses, str):
        raise TypeError("responses must be a list of strings, not one string")
    if not all(isinstance(response, str) for response in responses):
        raise TypeError("every response must be a string (got None or another type)")
    if contexts is not None and len(contexts) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(contexts)} contexts")


class Scorer:
    """The API: five- and three-way probabilities of utterances, optionally in context."""

    kind: str
    context_turns: int

    def predict_proba5(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `LABELS5` for each response given its context; (n, 5), rows sum to 1."""
        check_inputs(responses, contexts)
        if len(responses) == 0:
            return np.zeros((0, len(LABELS5)))
        return self._proba5(list(responses), context_texts(contexts, len(responses), self.context_turns))

    def predict_proba(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `THREE_WAY` (casual, needs_caution, needs_intervention); (n, 3), rows sum to 1."""
        return collapse_proba(self.predict_proba5(responses, contexts))

    def _proba5(self, texts: list[str], contexts: list[str] | None) -> np.ndarray:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write the model's own files into `folder` (scorer.json is written by the stage)."""
        raise NotImplementedError


# --- tfidf ----------------------------------------------------------------------------------------


def tfidf_vectorizer(config, vocabulary=None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, config.ngram_max), min_df=config.min_df,
                           max_features=config.max_features, sublinear_tf=True, dtype=np.float64,
                           vocabulary=vocabulary)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez_compressed` with fixed timestamps (equal arrays give equal bytes), written atomically;
    object arrays are refused, so `np.load(allow_pickle=False)` reads it back."""
    import zipfile

    from pipeline.artifacts import atomic_path

    with atomic_path(path) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


class TfidfScorer(Scorer):
    """TF-IDF features of the response (and of its context, as a second block) -> softmax(X W^T + b)."""

    kind = "tfidf"

    def __init__(self, vectorizer, coef: np.ndarray, intercept: np.ndarray, context_turns: int):
        self.vectorizer = vectorizer
        self.coef = coef  # (5, V) or (5, 2V) with a context block
        self.intercept = intercept  # (5,)
        self.context_turns = context_turns

    def features(self, texts: list[str], contexts: list[str] | None):
        """Sparse (n, V) features, or (n, 2V) with the context block beside the response block."""
        from scipy.sparse import hstack

        features = self.vectorizer.transform(texts)
        if contexts is not None:
            features = hstack([features, self.vectorizer.transform(contexts)], format="csr")
        return features

    def _proba5(self, texts, contexts):
        logits = np.asarray(self.features(texts, contexts) @ self.coef.T) + self.intercept  # (n, 5)
        return softmax(logits)

    def save(self, folder: Path) -> None:
        terms = np.array(self.vectorizer.get_feature_names_out(), dtype=str)
        write_npz(folder / TFIDF_FILE, terms=terms, idf=self.vectorizer.idf_, coef=self.coef, intercept=self.intercept)

    @classmethod
    def load(cls, folder: Path, config, context_turns: int) -> "TfidfScorer":
        path = folder / TFIDF_FILE
        try:
            with np.load(path, allow_pickle=False) as arrays:
                terms, idf, coef, intercept = (arrays[k] for k in ("terms", "idf", "coef", "intercept"))
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path}: cannot read the TF-IDF model ({error})") from None
        vectorizer = tfidf_vectorizer(config, vocabulary={term: i for i, term in enumerate(terms.tolist())})
        vectorizer.idf_ = idf
        return cls(vectorizer, coef, intercept, context_turns)


def train_tfidf(texts: list[str], contexts: list[str] | None, labels: np.ndarray, weights: np.ndarray,
                config, context_turns: int, seed: int) -> TfidfScorer:
    """Fit the vocabulary on the training texts and contexts, then the logistic regression.

    `labels` are indices into LABELS5, (n,); `weights` per-example weights, (n,).
    """
    from sklearn.linear_model import LogisticRegression

    vectorizer = tfidf_vectorizer(config)
    vectorizer.fit(texts + (contexts or []))
    scorer = TfidfScorer(vectorizer, np.zeros(0), np.zeros(0), context_turns)
    features = scorer.features(texts, contexts)
    # Newton-CG converges in a handful of iterations here (L-BFGS needs ~50, and is ~8x slower).
    model = LogisticRegression(C=config.C, max_iter=config.max_iter, solver="newton-cg", random_state=seed,
                               class_weight=None if config.class_weight == "none" else "balanced")
    model.fit(features, labels, sample_weight=weights)
    # Classes absent from the training labels get a column of zeros and a very low intercept, so
    # the output always has five columns in LABELS5 order.
    coef = np.zeros((len(LABELS5), features.shape[1]))
    intercept = np.full(len(LABELS5), -1e4)
    if len(model.classes_) == 1:
        intercept[model.classes_[0]] = 0.0
    elif len(model.classes_) == 2:  # binary LR keeps one row: logit(class 1) - logit(class 0)
        coef[model.classes_[1]] = model.coef_[0]
        intercept[model.classes_[1]] = model.intercept_[0]
        intercept[model.classes_[0]] = 0.0
    else:
        coef[model.classes_] = model.coef_
        intercept[model.classes_] = model.intercept_
    scorer.coef, scorer.intercept = coef, intercept
    log.info("tfidf: %d features, %d examples, %d iterations", features.shape[1], len(texts), int(model.n_iter_.max()))
    return scorer


# --- transformers (scratch and hf) ----------------------------------------------------------------


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformerScorer(Scorer):
    """A sequence classifier over `[CLS] response [SEP] context [SEP]`; softmax of its five logits."""

    def __init__(self, kind: str, model, tokenizer, max_length: int, batch_size: int, context_turns: int):
        self.kind = kind
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.context_turns = context_turns

    def encode(self, texts: list[str], contexts: list[str] | None):
        return self.tokenizer(texts, contexts, padding=True, truncation="longest_first",
                              max_length=self.max_length, return_tensors="pt")

    def _proba5(self, texts, contexts):
        import torch

        device = next(self.model.parameters()).device
        # Batches of similar length waste less compute on padding; the order is restored at the end.
        order = np.argsort([len(t) + (len(contexts[i]) if contexts else 0) for i, t in enumerate(texts)], kind="stable")
        probs = np.zeros((len(texts), len(LABELS5)))
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                index = order[start:start + self.batch_size]
                batch = self.encode([texts[i] for i in index], [contexts[i] for i in index] if contexts else None)
                logits = self.model(**batch.to(device)).logits.float()  # (B, 5)
                probs[index] = torch.softmax(logits, dim=-1).cpu().double().numpy()
        return probs

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder / ENCODER_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / ENCODER_DIR)

    @classmethod
    def load(cls, folder: Path, kind: str, config, context_turns: int) -> "TransformerScorer":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = folder / ENCODER_DIR
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot load the {kind} safety encoder ({str(error).splitlines()[0]})") from None
        return cls(kind, model.to(pick_device()), tokenizer, config.max_length, config.batch_size * 2, context_turns)


def train_wordpiece(texts: list[str], vocab_size: int, max_length: int):
    """A lower-cased WordPiece tokenizer trained on `texts`, with BERT's special tokens and pair template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_scratch(texts: list[str], config, seed: int):
    """A WordPiece tokenizer trained on `texts` and a randomly initialised small BERT classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_wordpiece(texts, config.vocab_size, config.max_length)
    torch.manual_seed(seed)
    model_config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.max_length, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS5), id2label=dict(enumerate(LABELS5)), label2id={l: i for i, l in enumerate(LABELS5)})
    return BertForSequenceClassification(model_config), tokenizer


def build_hf(config, seed: int):
    """The encoder `config.name` (hub name or local folder) with a fresh five-way classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name)
        model = AutoModelForSequenceClassification.from_pretrained(
            config.name, num_labels=len(LABELS5), id2label=dict(enumerate(LABELS5)),
            label2id={l: i for i, l in enumerate(LABELS5)}, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:
        raise DataError(f"safety.hf.name = {config.name!r} cannot be loaded ({str(error).splitlines()[0]}); "
                        "give a hub name reachable from here or a local folder") from None
    return model, tokenizer


def train_transformer(kind: str, texts: list[str], contexts: list[str] | None, labels: np.ndarray,
                      weights: np.ndarray, config, context_turns: int, seed: int) -> TransformerScorer:
    """Fine-tune a `scratch` or `hf` encoder with weighted cross-entropy; `labels`, `weights`: (n,)."""
    import torch
    from tqdm import tqdm

    # --- setup
    device = pick_device()
    if kind == "scratch":
        model, tokenizer = build_scratch(texts + (contexts or []), config, seed)
    else:
        model, tokenizer = build_hf(config, seed)
    scorer = TransformerScorer(kind, model.to(device), tokenizer, config.max_length, config.batch_size * 2,
                               context_turns)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    weights_t = torch.as_tensor(weights, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)

    # --- optimizer: AdamW, linear warm-up over the first 10% of steps, then linear decay to 0
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total_steps = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, total_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))

    # --- loop
    model.train()
    started, step = time.perf_counter(), 0
    progress = tqdm(total=total_steps, desc=f"safety {kind}", unit="step", mininterval=2)
    for epoch in range(config.epochs):
        for batch_index in torch.randperm(len(texts), generator=generator).split(config.batch_size):
            index = batch_index.tolist()
            batch = scorer.encode([texts[i] for i in index], [contexts[i] for i in index] if contexts else None)
            logits = model(**batch.to(device)).logits.float()  # (B, 5)
            losses = torch.nn.functional.cross_entropy(logits, labels_t[index].to(device), reduction="none")  # (B,)
            w = weights_t[index].to(device)
            loss = (losses * w).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    log.info("%s: %d steps over %d examples in %.1f s on %s", kind, step, len(texts),
             time.perf_counter() - started, device)
    return scorer


# --- one entry point per direction ----------------------------------------------------------------


def train_scorer(config, texts: list[str], contexts: list[list[str]], labels: np.ndarray,
                 weights: np.ndarray) -> Scorer:
    """Train the kind `config.model` (a SafetyConfig) on utterances with their previous turns."""
    joined = context_texts(contexts, len(texts), config.context_turns)
    if config.model == "tfidf":
        return train_tfidf(texts, joined, labels, weights, config.tfidf, config.context_turns, config.seed)
    return train_transformer(config.model, texts, joined, labels, weights, getattr(config, config.model),
                             config.context_turns, config.seed)


def scorer_record(config, extra: dict) -> dict:
    """The contents of scorer.json: kind, labels, resolved config, provenance and `extra` facts."""
    from pipeline.artifacts import git_commit, library_versions

    return {"kind": config.model, "labels5": list(LABELS5), "three_way": list(THREE_WAY),
            "context_turns": config.context_turns, "config": dataclasses.asdict(config),
            "git_commit": git_commit(), "library_versions": library_versions(), **extra}


def load_scorer(folder: str | Path) -> Scorer:
    """The scorer saved in `folder` by the safety stage; a DataError when it is missing or unreadable."""
    from pipeline.config import SafetyConfig, section_from_dict

    folder = Path(folder)
    path = folder / SCORER_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {SCORER_FILE}, not a safety classifier folder "
                        "(run `python -m pipeline safety` to make one)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        kind, config = record["kind"], record["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a valid {SCORER_FILE} ({error})") from None
    if kind not in KINDS:
        raise DataError(f"{path}: kind = {kind!r} is unknown (known: {', '.join(KINDS)})")
    if tuple(record.get("labels5", ())) != LABELS5:
        raise DataError(f"{path}: labels5 = {record.get('labels5')!r}, expected {list(LABELS5)}")
    config = section_from_dict(config, "safety", SafetyConfig, source=str(path))
    if kind == "tfidf":
        return TfidfScorer.load(folder, config.tfidf, config.context_turns)
    return TransformerScorer.load(folder, kind, getattr(config, kind), config.context_turns)
