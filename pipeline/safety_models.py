"""The text-classifier library: the safety classifier, the RoT-agreement scorer and the safety judge, on one base.

Both are a `TextScorer`: a trained `Classifier` of one kind plus its `Task`, which says what the
scorer is for (its params section, its labels, the text fields an example has). Fitting, saving,
loading and predicting are shared; each task only adds its own API:

    from pipeline.safety_models import load_scorer, load_agreement_scorer
    safety = load_scorer("models/safety")                 # SafetyScorer, trained by `python -m pipeline safety`
    safety.predict_proba5(responses, contexts=None)       # (n, 5), rows sum to 1, columns SAFETY_LABELS
    safety.predict_proba(responses, contexts=None)        # (n, 3), rows sum to 1, columns THREE_WAY
    agreement = load_agreement_scorer("models/rot_agreement")   # AgreementScorer (`rot_agreement` stage)
    agreement.predict_proba(rots, responses, contexts=None)     # (n, 3): AGREEMENT_LABELS
    judge = load_judge("models/judge")                    # JudgeScorer (`judge` stage), for evaluation only
    judge.predict_unsafe(responses, contexts=None)        # (n,) P(unsafe), from human reply labels

A classifier reads one or more *blocks* of text per example: `blocks[b][i]` is field b of example
i, then the joined context when the task reads one (safety: the utterance, the context; agreement:
the reply, the RoT, the context). `classifier.proba(blocks)` gives (n, len(labels)) probabilities.
Kinds (`<section>.model`):
- `tfidf`: word n-gram TF-IDF + multinomial logistic regression. Every block is a TF-IDF block
  over one shared vocabulary, with its own coefficients; `<section>.tfidf.char_ngram` adds character
  n-grams (a second shared vocabulary) to every block. A task with a `pair` of fields (the
  agreement scorer: reply and RoT) adds their *pairwise view* when `<section>.tfidf.pair_buckets`
  is positive (`pair_features`): side-by-side blocks cannot see whether a reply goes with its RoT
  or against it, because no column depends on both. Saved as `tfidf.npz` (terms, idf, char_terms,
  char_idf, coef, intercept, pair, pair_buckets), loaded with `np.load(allow_pickle=False)`.
- `scratch`: a small BERT encoder built from a config, with a WordPiece tokenizer trained on the
  training text. `hf`: any Hugging Face encoder (name or local path) through
  `AutoModelForSequenceClassification`. Both read the first block as the first segment and the
  others, joined by the separator token, as the second (`[CLS] response [SEP] context [SEP]`), so
  attention relates the reply to the RoT; saved with `save_pretrained` (safetensors) in `encoder/`.

The folder's `scorer.json` names the task, the kind and the labels, and carries the resolved
config, the git commit and the library versions; `TextScorer.load` reads it first. torch and
transformers are imported only by the transformer kinds, so loading a TF-IDF model stays light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from pipeline.config import JudgeConfig, RotAgreementConfig, SafetyConfig
from pipeline.errors import DataError
from pipeline.labels import COLLAPSE, REPLY_LABELS, SAFETY_LABELS, THREE_WAY

log = logging.getLogger(__name__)

AGREEMENT_LABELS = ("disagrees", "neutral", "agrees")  # MIC's A_agrees 0, 1, 2
# COLLAPSE_MATRIX[i, j] = 1 when five-way label i collapses to three-way label j; (5, 3)
COLLAPSE_MATRIX = np.array([[THREE_WAY.index(COLLAPSE[label]) == j for j in range(3)] for label in SAFETY_LABELS],
                           dtype=np.float64)
KINDS = ("tfidf", "scratch", "hf", "ensemble")
SCORER_FILE = "scorer.json"
ENCODER_DIR = "encoder"
TFIDF_FILE = "tfidf.npz"


@dataclasses.dataclass(frozen=True)
class Task:
    """What a classifier is for: `section` names its params section, stage and command; `labels`
    are its classes in column order; `fields` name an example's texts in block order (the context,
    when read, comes after them); `pair` indexes the two fields whose relation the TF-IDF kind's
    pairwise view describes (None: no pairwise view); `what` is how messages name it."""

    section: str
    labels: tuple[str, ...]
    fields: tuple[str, ...]
    pair: tuple[int, int] | None
    what: str


SAFETY = Task("safety", SAFETY_LABELS, ("responses",), None, "safety classifier")
AGREEMENT = Task("rot_agreement", AGREEMENT_LABELS, ("responses", "rots"), (0, 1), "RoT-agreement scorer")
JUDGE = Task("judge", REPLY_LABELS, ("responses",), None, "safety judge")
UNSAFE = REPLY_LABELS.index("unsafe")


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


class Classifier:
    """A trained model of one kind: probabilities of its `labels` for blocks of text."""

    kind: str
    labels: tuple[str, ...]

    def proba(self, blocks: list[list[str]]) -> np.ndarray:
        """Probabilities of `labels` for each example; blocks: B lists of n texts -> (n, len(labels))."""
        if len(blocks[0]) == 0:
            return np.zeros((0, len(self.labels)))
        return self._proba(blocks)

    def _proba(self, blocks: list[list[str]]) -> np.ndarray:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write the model's own files into `folder` (scorer.json is written by the scorer)."""
        raise NotImplementedError


# --- tfidf ----------------------------------------------------------------------------------------

WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern (so "don't" -> "don")
# Words that say no or condemn. "not", "no" and "never" are stop words to scikit-learn; here they are
# the point: "you should never do that" answers "It's wrong to X" the other way from "sure, do it".
NEGATIVE_WORDS = frozenset({"no", "not", "never", "nothing", "nobody", "none", "nor", "neither", "cannot", "don",
                            "doesn", "didn", "isn", "aren", "wasn", "weren", "won", "wouldn", "shouldn", "couldn",
                            "mustn", "wrong", "bad"})
SIMILARITY_FEATURES = ("cosine", "overlap", "negative_first", "negative_second", "negative_differs")


def tfidf_vectorizer(config, vocabulary=None):
    """Word 1..`config.ngram_max`-grams (`vocabulary`: the fitted terms, to load a model)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, config.ngram_max), min_df=config.min_df,
                           max_features=config.max_features, sublinear_tf=True, dtype=np.float64,
                           vocabulary=vocabulary)


def char_vectorizer(config, vocabulary=None):
    """Character `config.char_ngram[0]`..`[1]`-grams inside word boundaries; None when `char_ngram` is []."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not config.char_ngram:
        return None
    return TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(config.char_ngram), min_df=config.min_df,
                           max_features=config.max_features, sublinear_tf=True, dtype=np.float64,
                           vocabulary=vocabulary)


def pair_features(firsts: list[str], seconds: list[str], first_tfidf, second_tfidf, buckets: int):
    """The pairwise view of two fields (reply and RoT): sparse (n, buckets + 5).

    Columns 0 .. buckets - 1: every (word of `seconds[i]`, word of `firsts[i]`) pair hashed into a
    bucket, the row scaled to unit length, so the logistic regression can weigh "RoT says *wrong*,
    reply says *never*" apart from "RoT says *wrong*, reply says *sure*". Then
    `SIMILARITY_FEATURES`: the cosine of the two TF-IDF rows (`first_tfidf`, `second_tfidf`,
    (n, V), unit rows), the Jaccard overlap of their word sets, whether each has a word of
    `NEGATIVE_WORDS`, and whether exactly one of them has.
    """
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction import FeatureHasher

    first_words = [set(WORD.findall(text.lower())) for text in firsts]
    second_words = [set(WORD.findall(text.lower())) for text in seconds]
    crossed = [[f"{s} {f}" for s in second for f in first] for first, second in zip(first_words, second_words)]
    hashed = FeatureHasher(n_features=buckets, input_type="string", alternate_sign=False).transform(crossed)
    norms = np.sqrt(np.asarray(hashed.multiply(hashed).sum(axis=1)).ravel())
    hashed = csr_matrix(hashed.multiply(1 / np.maximum(norms, 1e-12)[:, None]))
    cosine = np.asarray(first_tfidf.multiply(second_tfidf).sum(axis=1)).ravel()
    similarity = np.array([
        [c, len(f & s) / max(1, len(f | s)), bool(f & NEGATIVE_WORDS), bool(s & NEGATIVE_WORDS),
         bool(f & NEGATIVE_WORDS) != bool(s & NEGATIVE_WORDS)]
        for c, f, s in zip(cosine, first_words, second_words)], dtype=np.float64).reshape(-1, 5)
    return hstack([hashed, csr_matrix(similarity)], format="csr")


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


class TfidfClassifier(Classifier):
    """TF-IDF features of each block side by side (and the pairwise view of `pair`) -> softmax(X W^T + b).

    A block's features are its word n-grams (V columns) and, with a `char_vectorizer`, its character
    n-grams (C more columns), one vocabulary of each shared by all blocks."""

    kind = "tfidf"

    def __init__(self, vectorizer, coef: np.ndarray, intercept: np.ndarray, labels: tuple[str, ...],
                 pair: tuple[int, int] | None = None, pair_buckets: int = 0, char_vectorizer=None):
        self.vectorizer = vectorizer
        self.char_vectorizer = char_vectorizer
        self.coef = coef  # (L, B * (V [+ C]) [+ pair_buckets + 5]): coefficients per text block, then the pair block
        self.intercept = intercept  # (L,)
        self.labels = labels
        self.pair = pair if pair_buckets > 0 else None
        self.pair_buckets = pair_buckets if self.pair else 0

    @property
    def pair_width(self) -> int:
        return self.pair_buckets + len(SIMILARITY_FEATURES) if self.pair else 0

    @property
    def block_width(self) -> int:
        """Feature columns per text block: the word vocabulary, and the character one when used."""
        chars = len(self.char_vectorizer.vocabulary_) if self.char_vectorizer is not None else 0
        return len(self.vectorizer.vocabulary_) + chars

    def features(self, blocks: list[list[str]]):
        """Sparse (n, B * block_width [+ pair_width]) features: each text block's word (then character)
        TF-IDF columns, in order, then the pairwise view of the blocks `pair` when there is one."""
        from scipy.sparse import hstack

        words = [self.vectorizer.transform(block) for block in blocks]
        features = words if self.char_vectorizer is None else [
            part for word, block in zip(words, blocks) for part in (word, self.char_vectorizer.transform(block))]
        if self.pair:
            first, second = self.pair
            features.append(pair_features(blocks[first], blocks[second], words[first], words[second],
                                          self.pair_buckets))
        return features[0] if len(features) == 1 else hstack(features, format="csr")

    def _proba(self, blocks):
        features = self.features(blocks)
        if features.shape[1] != self.coef.shape[1]:
            trained = (self.coef.shape[1] - self.pair_width) // self.block_width
            raise ValueError(f"got {len(blocks)} text blocks, the model was trained on {trained}")
        logits = np.asarray(features @ self.coef.T) + self.intercept  # (n, L)
        return softmax(logits)

    def save(self, folder: Path) -> None:
        def terms(vectorizer) -> np.ndarray:
            return np.array(vectorizer.get_feature_names_out() if vectorizer is not None else [], dtype=str)

        chars = self.char_vectorizer
        write_npz(folder / TFIDF_FILE, terms=terms(self.vectorizer), idf=self.vectorizer.idf_,
                  char_terms=terms(chars), char_idf=chars.idf_ if chars is not None else np.zeros(0),
                  coef=self.coef, intercept=self.intercept, pair=np.array(self.pair or (), dtype=np.int64),
                  pair_buckets=np.array(self.pair_buckets))

    @classmethod
    def load(cls, folder: Path, config, labels: tuple[str, ...]) -> "TfidfClassifier":
        path = folder / TFIDF_FILE
        names = ("terms", "idf", "char_terms", "char_idf", "coef", "intercept", "pair", "pair_buckets")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                terms, idf, char_terms, char_idf, coef, intercept, pair, buckets = (arrays[k] for k in names)
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path}: cannot read the TF-IDF model ({error})") from None
        if bool(config.char_ngram) != bool(len(char_terms)):
            raise DataError(f"{path}: {len(char_terms)} character n-grams, but {config.section}.char_ngram = "
                            f"{config.char_ngram} in its scorer.json")
        pair, buckets = (tuple(int(i) for i in pair) or None), int(buckets)
        vectorizer = tfidf_vectorizer(config, vocabulary={term: i for i, term in enumerate(terms.tolist())})
        vectorizer.idf_ = idf
        chars = char_vectorizer(config, vocabulary={term: i for i, term in enumerate(char_terms.tolist())})
        if chars is not None:
            chars.idf_ = char_idf
        classifier = cls(vectorizer, coef, intercept, labels, pair, buckets, chars)
        width = coef.shape[1] - classifier.pair_width if coef.ndim == 2 else -1
        if coef.ndim != 2 or coef.shape[0] != len(labels) or intercept.shape != (len(labels),) \
                or width <= 0 or width % max(1, classifier.block_width):
            raise DataError(f"{path}: coefficients of shape {coef.shape} do not fit {len(labels)} labels, "
                            f"{len(terms) + len(char_terms)} terms and a pair block of {classifier.pair_width}")
        return classifier


def train_tfidf(blocks: list[list[str]], labels: np.ndarray, weights: np.ndarray, config, label_names: tuple[str, ...],
                seed: int, pair: tuple[int, int] | None = None, pair_buckets: int = 0) -> TfidfClassifier:
    """Fit the vocabulary on every block's training texts, then the logistic regression.

    `labels` are indices into `label_names`, (n,); `weights` per-example weights, (n,); `pair`,
    `pair_buckets`: the pairwise view (see `pair_features`; none when either is unset).
    """
    from sklearn.linear_model import LogisticRegression

    texts = [text for block in blocks for text in block]
    vectorizer = tfidf_vectorizer(config).fit(texts)
    chars = char_vectorizer(config)
    if chars is not None:
        chars.fit(texts)
    classifier = TfidfClassifier(vectorizer, np.zeros(0), np.zeros(0), label_names, pair, pair_buckets, chars)
    features = classifier.features(blocks)
    # Newton-CG converges in a handful of iterations here (L-BFGS needs ~50, and is ~8x slower).
    model = LogisticRegression(C=config.C, max_iter=config.max_iter, solver="newton-cg", random_state=seed,
                               class_weight=None if config.class_weight == "none" else "balanced")
    model.fit(features, labels, sample_weight=weights)
    # Classes absent from the training labels get a column of zeros and a very low intercept, so
    # the output always has a column per label, in `label_names` order.
    coef = np.zeros((len(label_names), features.shape[1]))
    intercept = np.full(len(label_names), -1e4)
    if len(model.classes_) == 1:
        intercept[model.classes_[0]] = 0.0
    elif len(model.classes_) == 2:  # binary LR keeps one row: logit(class 1) - logit(class 0)
        coef[model.classes_[1]] = model.coef_[0]
        intercept[model.classes_[1]] = model.intercept_[0]
        intercept[model.classes_[0]] = 0.0
    else:
        coef[model.classes_] = model.coef_
        intercept[model.classes_] = model.intercept_
    classifier.coef, classifier.intercept = coef, intercept
    log.info("tfidf: %d features, %d examples, %d iterations", features.shape[1], len(labels), int(model.n_iter_.max()))
    return classifier


# --- transformers (scratch and hf) ----------------------------------------------------------------


class TransformerClassifier(Classifier):
    """A sequence classifier over `[CLS] block 1 [SEP] block 2 [SEP] ... [SEP]`; softmax of its logits."""

    def __init__(self, kind: str, model, tokenizer, max_length: int, batch_size: int, labels: tuple[str, ...]):
        self.kind = kind
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.labels = labels

    def encode(self, rows: list[tuple[str, ...]]):
        """Tokenize examples, each a tuple of its blocks' texts: the first block is the first segment,
        the rest, joined by the separator token, the second (truncated longest-first)."""
        firsts = [row[0] for row in rows]
        seconds = None if len(rows[0]) == 1 else [f" {self.tokenizer.sep_token} ".join(row[1:]) for row in rows]
        return self.tokenizer(firsts, seconds, padding=True, truncation="longest_first",
                              max_length=self.max_length, return_tensors="pt")

    def _proba(self, blocks):
        import torch

        device = next(self.model.parameters()).device
        rows = list(zip(*blocks))
        # Batches of similar length waste less compute on padding; the order is restored at the end.
        order = np.argsort([sum(len(text) for text in row) for row in rows], kind="stable")
        probs = np.zeros((len(rows), len(self.labels)))
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                index = order[start:start + self.batch_size]
                batch = self.encode([rows[i] for i in index])
                logits = self.model(**batch.to(device)).logits.float()  # (B, L)
                probs[index] = torch.softmax(logits, dim=-1).cpu().double().numpy()
        return probs

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder / ENCODER_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / ENCODER_DIR)

    @classmethod
    def load(cls, folder: Path, kind: str, config, task: Task) -> "TransformerClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.devices import model_device

        path = folder / ENCODER_DIR
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                                       trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot load the {kind} {task.what} encoder "
                            f"({str(error).splitlines()[0]})") from None
        if model.config.num_labels != len(task.labels):
            raise DataError(f"{path}: the encoder has {model.config.num_labels} outputs, expected {len(task.labels)}")
        return cls(kind, model.to(model_device()), tokenizer, config.max_length, config.batch_size * 2, task.labels)


class EnsembleClassifier(Classifier):
    """A TF-IDF and a transformer classifier of the same labels, their probabilities averaged; saved side
    by side in one folder (`tfidf.npz`, `encoder/`)."""

    kind = "ensemble"

    def __init__(self, members: list[Classifier]):
        self.members = members
        self.labels = members[0].labels

    def _proba(self, blocks):
        return np.mean([member.proba(blocks) for member in self.members], axis=0)

    def save(self, folder: Path) -> None:
        for member in self.members:
            member.save(folder)


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


def build_scratch(texts: list[str], config, seed: int, labels: tuple[str, ...]):
    """A WordPiece tokenizer trained on `texts` and a randomly initialised small BERT classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_wordpiece(texts, config.vocab_size, config.max_length)
    torch.manual_seed(seed)
    model_config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.max_length, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    return BertForSequenceClassification(model_config), tokenizer


def build_hf(config, seed: int, labels: tuple[str, ...]):
    """The encoder `config.name` (hub name or local folder) with a fresh classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    try:
        # No remote code, ever (there is no opt-in for the classifiers); pickled weights only as tensors.
        tokenizer = AutoTokenizer.from_pretrained(config.name, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            config.name, trust_remote_code=False, weights_only=True, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:
        raise DataError(f"{config.section}.name = {config.name!r} cannot be loaded ({str(error).splitlines()[0]}); "
                        "give a hub name reachable from here or a local folder") from None
    return model, tokenizer


def train_transformer(kind: str, blocks: list[list[str]], labels: np.ndarray, weights: np.ndarray, config,
                      task: Task, seed: int) -> TransformerClassifier:
    """Fine-tune a `scratch` or `hf` encoder with weighted cross-entropy; `labels`, `weights`: (n,)."""
    import torch
    from tqdm import tqdm

    from pipeline.devices import model_device

    # --- setup
    device = model_device()
    if kind == "scratch":
        model, tokenizer = build_scratch([text for block in blocks for text in block], config, seed, task.labels)
    else:
        model, tokenizer = build_hf(config, seed, task.labels)
    classifier = TransformerClassifier(kind, model.to(device), tokenizer, config.max_length, config.batch_size * 2,
                                       task.labels)
    rows = list(zip(*blocks))
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    weights_t = torch.as_tensor(weights, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)

    # --- optimizer: AdamW, linear warm-up over the first 10% of steps, then linear decay to 0
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total_steps = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, total_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))

    # --- loop
    model.train()
    started, step = time.perf_counter(), 0
    progress = tqdm(total=total_steps, desc=f"{task.section} {kind}", unit="step", mininterval=2)
    for epoch in range(config.epochs):
        for batch_index in torch.randperm(len(rows), generator=generator).split(config.batch_size):
            index = batch_index.tolist()
            batch = classifier.encode([rows[i] for i in index])
            logits = model(**batch.to(device)).logits.float()  # (B, L)
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
    log.info("%s %s: %d steps over %d examples in %.1f s on %s", task.section, kind, step, len(rows),
             time.perf_counter() - started, device)
    return classifier


# --- scorers: a task's API over a trained classifier ----------------------------------------------


class TextScorer:
    """A trained classifier of `task`: probabilities of its labels for examples of its text fields,
    each optionally in context (the last `context_turns` turns). Subclasses set `task` and
    `config_class` (the dataclass of the task's params section) and name their own API."""

    task: ClassVar[Task]
    config_class: ClassVar[type]

    def __init__(self, classifier: Classifier, context_turns: int):
        self.classifier = classifier
        self.context_turns = context_turns

    @property
    def kind(self) -> str:
        return self.classifier.kind

    @classmethod
    def blocks(cls, fields: Sequence[Sequence[str]], contexts, context_turns: int) -> list[list[str]]:
        """The classifier's text blocks: each field's texts (in `task.fields` order), then the joined
        contexts when `context_turns` > 0. A TypeError or ValueError for texts of the wrong type or count."""
        for name, texts in zip(cls.task.fields, fields):
            if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
                raise TypeError(f"{name} must be a list of strings (got a string, None or another type)")
        counts = {len(texts) for texts in fields} | ({len(contexts)} if contexts is not None else set())
        if len(counts) > 1:
            given = ", ".join(f"{len(texts)} {name}" for name, texts in zip(cls.task.fields, fields))
            raise ValueError(f"got {given} and {'no' if contexts is None else len(contexts)} contexts; "
                             "the counts must match")
        joined = context_texts(contexts, len(fields[0]), context_turns)
        return [list(texts) for texts in fields] + ([joined] if joined is not None else [])

    def proba(self, fields: Sequence[Sequence[str]], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `task.labels`; fields: one list of n texts per `task.fields` -> (n, L), rows sum to 1."""
        return self.classifier.proba(self.blocks(fields, contexts, self.context_turns))

    def save(self, folder: Path) -> None:
        """Write the model's own files into `folder` (`record` gives scorer.json's contents)."""
        self.classifier.save(folder)

    def write(self, out: Path, config, extra: dict) -> None:
        """Write the model folder `out` atomically: the model's files and scorer.json (`record`)."""
        from pipeline.artifacts import staged_dir, write_json

        with staged_dir(out) as folder:
            self.save(folder)
            write_json(self.record(config, extra), folder / SCORER_FILE)

    @classmethod
    def fit(cls, config, fields: Sequence[Sequence[str]], contexts, labels: np.ndarray, weights: np.ndarray):
        """Train the kind `config.model` (`config`: the task's section) on examples of `task.fields`
        (one list of n texts each) with their contexts; `labels` index `task.labels`, (n,); `weights` (n,)."""
        blocks = cls.blocks(fields, contexts, config.context_turns)
        members = []
        if config.model in ("tfidf", "ensemble"):
            pair_buckets = config.tfidf.pair_buckets if cls.task.pair else 0
            members.append(train_tfidf(blocks, labels, weights, config.tfidf, cls.task.labels, config.seed,
                                       cls.task.pair, pair_buckets))
        if config.model != "tfidf":
            kind = "hf" if config.model == "ensemble" else config.model
            members.append(train_transformer(kind, blocks, labels, weights, getattr(config, kind), cls.task,
                                             config.seed))
        classifier = EnsembleClassifier(members) if config.model == "ensemble" else members[0]
        return cls(classifier, config.context_turns)

    @classmethod
    def record(cls, config, extra: dict) -> dict:
        """The contents of scorer.json: task, kind, labels, resolved config, provenance and `extra` facts."""
        from pipeline.artifacts import git_commit, library_versions

        return {"task": cls.task.section, "kind": config.model, "labels": list(cls.task.labels),
                "context_turns": config.context_turns, "config": dataclasses.asdict(config),
                "git_commit": git_commit(), "library_versions": library_versions(), **extra}

    @classmethod
    def load(cls, folder: str | Path):
        """The scorer saved in `folder`; a DataError when the folder is missing, unreadable, or holds
        another task's model."""
        from pipeline.config import section_from_dict

        task, folder = cls.task, Path(folder)
        path = folder / SCORER_FILE
        if not path.is_file():
            raise DataError(f"{folder}: no {SCORER_FILE}, not a {task.what} folder "
                            f"(run `python -m pipeline {task.section}` to make one)")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            kind, config = record["kind"], record["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not a valid {SCORER_FILE} ({error})") from None
        if kind not in KINDS:
            raise DataError(f"{path}: kind = {kind!r} is unknown (known: {', '.join(KINDS)})")
        if record.get("task") != task.section:
            raise DataError(f"{path}: task = {record.get('task')!r}, not a {task.what} "
                            f"(made by `python -m pipeline {task.section}`)")
        if tuple(record.get("labels", ())) != task.labels:
            raise DataError(f"{path}: labels = {record.get('labels')!r}, expected {list(task.labels)}")
        config = section_from_dict(config, task.section, cls.config_class, source=str(path))
        if kind == "tfidf":
            classifier = TfidfClassifier.load(folder, config.tfidf, task.labels)
        elif kind == "ensemble":
            classifier = EnsembleClassifier([TfidfClassifier.load(folder, config.tfidf, task.labels),
                                             TransformerClassifier.load(folder, "hf", config.hf, task)])
        else:
            classifier = TransformerClassifier.load(folder, kind, getattr(config, kind), task)
        return cls(classifier, config.context_turns)


class SafetyScorer(TextScorer):
    """ProsocialDialog's five safety labels of utterances (optionally in context), and their three-way sums."""

    task = SAFETY
    config_class = SafetyConfig

    def predict_proba5(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `SAFETY_LABELS` for each response given its context; (n, 5), rows sum to 1."""
        return self.proba([responses], contexts)

    def predict_proba(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `THREE_WAY` (casual, needs_caution, needs_intervention); (n, 3), rows sum to 1."""
        return collapse_proba(self.predict_proba5(responses, contexts))

    @classmethod
    def record(cls, config, extra: dict) -> dict:
        return super().record(config, {"labels5": list(SAFETY_LABELS), "three_way": list(THREE_WAY), **extra})


class AgreementScorer(TextScorer):
    """P(disagrees, neutral, agrees) of replies with rules-of-thumb, optionally in context."""

    task = AGREEMENT
    config_class = RotAgreementConfig

    def predict_proba(self, rots: Sequence[str], responses: Sequence[str],
                      contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `AGREEMENT_LABELS` for each reply against its RoT; (n, 3), rows sum to 1.

        rots, responses: n strings each; contexts: n lists of previous turns (oldest first) or None.
        """
        return self.proba([responses, rots], contexts)


class JudgeScorer(TextScorer):
    """P(safe, unsafe) of replies in context, learned from human reply labels (DiaSafety, ToxiChat) of
    corpora the safety classifier never sees: the evaluation's judge, never the re-ranker's."""

    task = JUDGE
    config_class = JudgeConfig

    def predict_proba(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `REPLY_LABELS` (safe, unsafe) for each reply given its context; (n, 2), rows sum to 1."""
        return self.proba([responses], contexts)

    def predict_unsafe(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """P(unsafe) of each reply given its context (n lists of previous turns, oldest first, or None); (n,)."""
        return self.predict_proba(responses, contexts)[:, UNSAFE]

    def member_judges(self) -> dict[str, "JudgeScorer"]:
        """An ensemble's members, each a judge of its own (kind -> judge, in the ensemble's order; the
        ensemble's P(unsafe) is their mean); {} for a single classifier."""
        members = getattr(self.classifier, "members", None) or []
        return {member.kind: JudgeScorer(member, self.context_turns) for member in members}


def write_reports(task: Task, reports: Path, metrics: dict, confusion: list[dict],
                  summary: dict[str, dict[str, float | int | None]]) -> None:
    """Write a stage's `metrics.json` and `confusion.json` into `reports`, and log `summary` (split ->
    the figures to show, None where there are no examples) one line per split."""
    from pipeline.artifacts import write_json

    write_json(metrics, reports / "metrics.json")
    write_json(confusion, reports / "confusion.json")
    for split, figures in summary.items():
        shown = " ".join(f"{key}={'n/a' if value is None else round(value, 3)}" for key, value in figures.items())
        log.info("%s %s: %s %s", task.section, metrics.get("model"), split, shown)


def load_scorer(folder: str | Path) -> SafetyScorer:
    """The safety classifier saved in `folder` by the safety stage; a DataError when it is missing or unreadable."""
    return SafetyScorer.load(folder)


def load_judge(folder: str | Path) -> JudgeScorer:
    """The safety judge saved in `folder` by the judge stage; a DataError when it is missing, unreadable
    or another task's model (e.g. the safety classifier's folder)."""
    return JudgeScorer.load(folder)


def load_agreement_scorer(folder: str | Path) -> AgreementScorer:
    """The RoT-agreement scorer saved in `folder` by the rot_agreement stage; a DataError when it is
    missing, unreadable or another task's model (e.g. the safety classifier's folder)."""
    return AgreementScorer.load(folder)
