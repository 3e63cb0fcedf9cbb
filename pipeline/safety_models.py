"""Text classifiers of three kinds behind one API, with safe (pickle-free) saving and loading.

Two tasks share this machinery, each a `Task` (its params section and its labels):
- the safety classifier (`SAFETY`, section `safety`): ProsocialDialog's five safety labels
  (`LABELS5`) of an utterance in context; the three-way probabilities (`THREE_WAY`) are sums of
  the five. Its API is `Scorer`:

      scorer.predict_proba5(responses, contexts=None)  # (n, 5), rows sum to 1, columns LABELS5
      scorer.predict_proba(responses, contexts=None)   # (n, 3), rows sum to 1, columns THREE_WAY

- the RoT-agreement scorer (section `rot_agreement`, `pipeline.stages.rot_agreement`): whether a
  reply disagrees with, is neutral to or agrees with a rule-of-thumb, in context.

A classifier reads one or more *blocks* of text per example: `blocks[b][i]` is field b of example
i (safety: the utterance, then its context; agreement: the reply, the RoT, then the context).
`classifier.proba(blocks)` gives (n, len(labels)) probabilities. Kinds (`<section>.model`):
- `tfidf`: word n-gram TF-IDF + multinomial logistic regression. Every block is a TF-IDF block
  over one shared vocabulary, with its own coefficients. Saved as `tfidf.npz` (terms, idf, coef,
  intercept), loaded with `np.load(allow_pickle=False)`.
- `scratch`: a small BERT encoder built from a config, with a WordPiece tokenizer trained on the
  training text. `hf`: any Hugging Face encoder (name or local path) through
  `AutoModelForSequenceClassification`. Both read the first block as the first segment and the
  others, joined by the separator token, as the second (`[CLS] response [SEP] context [SEP]`), and
  are saved with `save_pretrained` (safetensors) in `encoder/`.

The folder's `scorer.json` names the task, the kind and the labels, and carries the resolved
config, the git commit and the library versions; `load_classifier` reads it first. torch and
transformers are imported only by the transformer kinds, so loading a TF-IDF model stays light.
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
from pipeline.labels import COLLAPSE, THREE_WAY
from pipeline.labels import SAFETY_LABELS as LABELS5

log = logging.getLogger(__name__)

# COLLAPSE_MATRIX[i, j] = 1 when five-way label i collapses to three-way label j; (5, 3)
COLLAPSE_MATRIX = np.array([[THREE_WAY.index(COLLAPSE[label]) == j for j in range(3)] for label in LABELS5],
                           dtype=np.float64)
KINDS = ("tfidf", "scratch", "hf")
SCORER_FILE = "scorer.json"
ENCODER_DIR = "encoder"
TFIDF_FILE = "tfidf.npz"


@dataclasses.dataclass(frozen=True)
class Task:
    """What a classifier is for: `section` names its params section, stage and command; `labels`
    are its classes in column order; `what` is how messages name it."""

    section: str
    labels: tuple[str, ...]
    what: str


SAFETY = Task("safety", LABELS5, "safety classifier")


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
        """Write the model's own files into `folder` (scorer.json is written by the stage)."""
        raise NotImplementedError


class Scorer:
    """The safety API: five- and three-way probabilities of utterances, optionally in context."""

    def __init__(self, classifier: Classifier, context_turns: int):
        self.classifier = classifier
        self.context_turns = context_turns

    @property
    def kind(self) -> str:
        return self.classifier.kind

    def predict_proba5(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `LABELS5` for each response given its context; (n, 5), rows sum to 1."""
        check_inputs(responses, contexts)
        joined = context_texts(contexts, len(responses), self.context_turns)
        return self.classifier.proba([list(responses)] + ([joined] if joined is not None else []))

    def predict_proba(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Probabilities of `THREE_WAY` (casual, needs_caution, needs_intervention); (n, 3), rows sum to 1."""
        return collapse_proba(self.predict_proba5(responses, contexts))

    def save(self, folder: Path) -> None:
        self.classifier.save(folder)


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


class TfidfClassifier(Classifier):
    """TF-IDF features of each block side by side -> softmax(X W^T + b)."""

    kind = "tfidf"

    def __init__(self, vectorizer, coef: np.ndarray, intercept: np.ndarray, labels: tuple[str, ...]):
        self.vectorizer = vectorizer
        self.coef = coef  # (L, B * V): a block of V coefficients per text block
        self.intercept = intercept  # (L,)
        self.labels = labels

    def features(self, blocks: list[list[str]]):
        """Sparse (n, B * V) features: one TF-IDF block per text block, in order."""
        from scipy.sparse import hstack

        features = [self.vectorizer.transform(block) for block in blocks]
        return features[0] if len(features) == 1 else hstack(features, format="csr")

    def _proba(self, blocks):
        features = self.features(blocks)
        if features.shape[1] != self.coef.shape[1]:
            trained = self.coef.shape[1] // len(self.vectorizer.vocabulary_)
            raise ValueError(f"got {len(blocks)} text blocks, the model was trained on {trained}")
        logits = np.asarray(features @ self.coef.T) + self.intercept  # (n, L)
        return softmax(logits)

    def save(self, folder: Path) -> None:
        terms = np.array(self.vectorizer.get_feature_names_out(), dtype=str)
        write_npz(folder / TFIDF_FILE, terms=terms, idf=self.vectorizer.idf_, coef=self.coef, intercept=self.intercept)

    @classmethod
    def load(cls, folder: Path, config, labels: tuple[str, ...]) -> "TfidfClassifier":
        path = folder / TFIDF_FILE
        try:
            with np.load(path, allow_pickle=False) as arrays:
                terms, idf, coef, intercept = (arrays[k] for k in ("terms", "idf", "coef", "intercept"))
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path}: cannot read the TF-IDF model ({error})") from None
        if coef.shape[0] != len(labels) or intercept.shape != (len(labels),) or coef.shape[1] % max(1, len(terms)):
            raise DataError(f"{path}: coefficients of shape {coef.shape} do not fit {len(labels)} labels and "
                            f"{len(terms)} terms")
        vectorizer = tfidf_vectorizer(config, vocabulary={term: i for i, term in enumerate(terms.tolist())})
        vectorizer.idf_ = idf
        return cls(vectorizer, coef, intercept, labels)


def train_tfidf(blocks: list[list[str]], labels: np.ndarray, weights: np.ndarray, config, label_names: tuple[str, ...],
                seed: int) -> TfidfClassifier:
    """Fit the vocabulary on every block's training texts, then the logistic regression.

    `labels` are indices into `label_names`, (n,); `weights` per-example weights, (n,).
    """
    from sklearn.linear_model import LogisticRegression

    vectorizer = tfidf_vectorizer(config)
    vectorizer.fit([text for block in blocks for text in block])
    classifier = TfidfClassifier(vectorizer, np.zeros(0), np.zeros(0), label_names)
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


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
        return cls(kind, model.to(pick_device()), tokenizer, config.max_length, config.batch_size * 2, task.labels)


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

    # --- setup
    device = pick_device()
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


# --- one entry point per direction ----------------------------------------------------------------


def train_classifier(task: Task, config, blocks: list[list[str]], labels: np.ndarray,
                     weights: np.ndarray) -> Classifier:
    """Train the kind `config.model` on text blocks (each a list of n texts); `labels` index
    `task.labels`, (n,); `weights` (n,). `config` is the task's section (`model`, `seed`, and one
    subsection per kind)."""
    if config.model == "tfidf":
        return train_tfidf(blocks, labels, weights, config.tfidf, task.labels, config.seed)
    return train_transformer(config.model, blocks, labels, weights, getattr(config, config.model), task, config.seed)


def classifier_record(task: Task, config, extra: dict) -> dict:
    """The contents of scorer.json: task, kind, labels, resolved config, provenance and `extra` facts."""
    from pipeline.artifacts import git_commit, library_versions

    return {"task": task.section, "kind": config.model, "labels": list(task.labels),
            "context_turns": config.context_turns, "config": dataclasses.asdict(config),
            "git_commit": git_commit(), "library_versions": library_versions(), **extra}


def load_classifier(folder: str | Path, task: Task, config_class: type):
    """(classifier, config) saved in `folder` for `task`, whose section builds `config_class`; a
    DataError when the folder is missing, unreadable, or holds another task's model."""
    from pipeline.config import section_from_dict

    folder = Path(folder)
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
    config = section_from_dict(config, task.section, config_class, source=str(path))
    if kind == "tfidf":
        return TfidfClassifier.load(folder, config.tfidf, task.labels), config
    return TransformerClassifier.load(folder, kind, getattr(config, kind), task), config


# --- the safety classifier ------------------------------------------------------------------------


def train_scorer(config, texts: list[str], contexts: list[list[str]], labels: np.ndarray,
                 weights: np.ndarray) -> Scorer:
    """Train the safety kind `config.model` (a SafetyConfig) on utterances with their previous turns;
    `labels` index LABELS5."""
    joined = context_texts(contexts, len(texts), config.context_turns)
    blocks = [list(texts)] + ([joined] if joined is not None else [])
    return Scorer(train_classifier(SAFETY, config, blocks, labels, weights), config.context_turns)


def scorer_record(config, extra: dict) -> dict:
    """The contents of a safety classifier's scorer.json (`classifier_record` plus the label sets)."""
    return {**classifier_record(SAFETY, config, {}), "labels5": list(LABELS5), "three_way": list(THREE_WAY), **extra}


def load_scorer(folder: str | Path) -> Scorer:
    """The scorer saved in `folder` by the safety stage; a DataError when it is missing or unreadable."""
    from pipeline.config import SafetyConfig

    classifier, config = load_classifier(folder, SAFETY, SafetyConfig)
    return Scorer(classifier, config.context_turns)
