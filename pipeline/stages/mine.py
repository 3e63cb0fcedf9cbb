"""mine: socially aware n-pair groups (one prosocial positive, `n - 1` unacceptable negatives).

Stage 1 reads `data/normalized/<corpus>/<split>.parquet` of the adversarial corpora
(`mine.stage1_corpora`: ProsocialDialog, MIC, DiaSafety and ToxiChat by default); stage 2
reads the casual corpora (`mine.stage2_corpora`), the adversarial ones (only as the pool of hard
negatives) and a `mine.replay` share of `data/groups/stage1/<split>.parquet`. Both read the safety
classifier in `models/safety`; stage 2 with `mine.generated` also samples from the stage-1 model in
`models/stage1`. Writes
`data/groups/stage<k>/{train,validation,test}.parquet` (schema `schemas.GROUPS`) and `stats.json`:
groups per corpus, negatives per source, every shortfall and who filled it, every skipped context and
why, and how the stage-1 model was sampled. With `mine.stage<k>_max_groups`, each corpus keeps at most
that many groups per split, a seeded sample of those mined (`capped` in stats.json: how many there were).

    python -m pipeline mine --stage 1 --normalized data/normalized --safety models/safety --out data/groups/stage1
    python -m pipeline mine --stage 2 --normalized data/normalized --safety models/safety \\
        --stage1-groups data/groups/stage1 --stage1-model models/stage1 --out data/groups/stage2

A negative comes from one of four sources, tried in this order (`config.MINE_SOURCES`):
`context` (known unacceptable replies to this very context: MIC answers that violate the RoT,
replies humans labelled unsafe for the same context), `hard` (unsafe ProsocialDialog utterances,
RoT-violating MIC answers and human-labelled unsafe replies, retrieved by TF-IDF similarity of the
context's last turn to the utterance, the answer, or the last turn the reply answered),
`random` (replies from other dialogues) and `generated`
(stage-1 model samples that the safety classifier flags; stage 2 only). Each group's `n - 1` slots are
drawn from the configured shares; a source that cannot fill its slots passes the rest to the next
source (cyclically), and a context no source can complete is skipped. Both are counted.

Every negative carries a severity in [0, 1]: the ProsocialDialog label weight (`mine.label_severity`),
the MIC violation severity / 5, the human label of an unsafe reply (`mine.reply_severity`), or the
classifier's 1 - P(casual) (random replies: at least `mine.random_severity`; generated ones: exactly
that). Pools are built per split, so no text crosses splits.

Corpora whose replies carry a human safety label (`reply_label`: DiaSafety, ToxiChat) follow the
labels (`labelled_replies`): a reply humans judged safe (ToxiChat: neither offensive nor agreeing
with an offensive turn) is a group's positive; a reply judged unsafe is never one, only a negative:
first for its own context (all of such a group's slots go to `context`), then, through the usual
shortfall rule, for the most similar contexts (`hard`, retrieving from the human-labelled unsafe
replies only). Severities, by default: offensive and agreeing 1.0 > offensive 0.8 > agreeing only
0.7 > DiaSafety's unsafe for one category 0.6. A context whose replies are all unsafe gives no group
(counted under `skipped`).

The stage-1 sampler (`Stage1Sampler`) runs the model on the GPU when there is one, at
`mine.precision` (`pipeline.devices`), `mine.generated_batch_size` contexts per `generate` call, and
decodes exactly as the `mine.generated_*` keys say (`stage1_decoding`, `pipeline.sampling`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.artifacts import ensure_writable, staged_dir, write_json, write_parquet
from pipeline.config import MINE_SOURCES, SPLITS, GenerateConfig, MineConfig
from pipeline.contexts import Halves
from pipeline.errors import ConfigError, DataError
from pipeline.safety_models import load_scorer
from pipeline.schemas import GROUPS, NEGATIVE, NORMALIZED, read_table

log = logging.getLogger(__name__)

ROW_CHUNK = 8192  # contexts per mining step; fixed, so the random draws do not depend on the machine
PRODUCT_BUDGET = 1 << 24  # at most chunk x pool similarity entries per sparse product
SKIP_EXHAUSTED = "fewer than n - 1 distinct negatives in all sources"
SKIP_EMPTY_CONTEXT = "empty context"
SKIP_NO_SAFE_REPLY = "contexts whose every reply humans judged unsafe"
LABELLED_QUOTA = np.eye(len(MINE_SOURCES), dtype=np.int64)[MINE_SOURCES.index("context")]  # x slots


class Scorer(Protocol):
    """The safety classifier's API (`pipeline.safety_models.SafetyScorer`): (n, 3) probabilities in
    `THREE_WAY` order, casual first."""

    def predict_proba(self, responses: list[str], contexts: list[list[str]] | None = None) -> np.ndarray: ...


class Generate(Protocol):
    """The stage-1 model's sampler (`Stage1Sampler`): `generate(contexts, k)` gives `k` sampled replies
    per context; `settings` says how (written to stats.json)."""

    settings: dict

    def __call__(self, contexts: list[list[str]], k: int) -> list[list[str]]: ...


# --- the stage-1 sampler --------------------------------------------------------------------------


def stage1_decoding(config: MineConfig) -> GenerateConfig:
    """The stage-1 sampler's decoding settings, all from the `mine` section (nothing from `generate`
    nor from the checkpoint's own generation config): ancestral sampling with
    `mine.generated_temperature`, `_top_p`, `_top_k`, at most `mine.generated_max_new_tokens`."""
    return GenerateConfig(seed=config.seed, k=config.generated_k, batch_size=config.generated_batch_size,
                          max_source_tokens=config.generated_max_source_tokens,
                          max_new_tokens=config.generated_max_new_tokens, do_sample=True,
                          temperature=config.generated_temperature, top_p=config.generated_top_p,
                          top_k=config.generated_top_k, precision=config.precision)


class Stage1Sampler:
    """Samples replies (their RoTs removed) from the stage-1 model for the `generated` source.

    `decoding` gives every decoding setting (`stage1_decoding`) and the batch size; the model runs on
    `device` at `precision` (resolved); batch b is seeded by (`mine.seed`, b), so the samples are
    reproducible.
    """

    def __init__(self, dm, decoding: GenerateConfig, device: str, precision: str):
        self.dm, self.decoding, self.device, self.precision = dm, decoding, device, precision
        self.batches = 0

    @property
    def settings(self) -> dict:
        from pipeline.sampling import decoding_settings

        return {"model": str(self.dm.path), "device": self.device, "precision": self.precision,
                "batch_size": self.decoding.batch_size, "max_source_tokens": self.decoding.max_source_tokens,
                "decoding": decoding_settings(self.dm, self.decoding)}

    def __call__(self, contexts: list[list[str]], k: int) -> list[list[str]]:
        from tqdm import tqdm

        from pipeline import devices
        from pipeline.modeling import Source
        from pipeline.sampling import batch_seed, encode_prompts, generate_batch

        decoding, size = dataclasses.replace(self.decoding, k=k), self.decoding.batch_size
        replies: list[list[str]] = []
        starts = range(0, len(contexts), size)
        for start in tqdm(starts, desc="mine: stage-1 samples", unit="batch", mininterval=5, disable=len(starts) < 2):
            batch = contexts[start:start + size]
            prompts = encode_prompts(self.dm, [Source(context) for context in batch], decoding)
            seed = batch_seed(decoding.seed, "mine", self.batches)
            with devices.autocast(self.device, self.precision):
                target_ids, _ = generate_batch(self.dm, prompts, decoding, seed, logprobs=False)
            self.batches += 1
            texts = [self.dm.format.read(self.dm.tokenizer, ids).reply for ids in target_ids]
            replies += [texts[i * k:(i + 1) * k] for i in range(len(batch))]
        return replies


def load_stage1_generator(model_dir: Path | None, config: MineConfig) -> Stage1Sampler:
    """The stage-1 model in `model_dir` as the `generated` source's sampler, on the model device at
    `mine.precision` (checked before the model is loaded)."""
    from pipeline import devices
    from pipeline.scoring import load_init_model

    if model_dir is None:
        raise ConfigError("mine.generated = true needs the stage-1 model: pass --stage1-model models/stage1")
    precision = devices.resolve_precision(config.precision, "mine.precision")
    device = devices.model_device()
    dm = load_init_model(Path(model_dir))
    dm.model.to(device).eval()
    return Stage1Sampler(dm, stage1_decoding(config), device, precision)


# --- text keys, items -----------------------------------------------------------------------------


def text_keys(texts: pa.Array) -> pa.Array:
    """Comparison keys: lower case, whitespace runs collapsed to one space, ends trimmed."""
    collapsed = pc.binary_join(pc.utf8_split_whitespace(texts), " ")  # much faster than a regex
    return pc.utf8_lower(pc.utf8_trim_whitespace(collapsed))


def last_turns(context: pa.Array) -> pa.Array:
    """The last turn of each context (the partner's utterance the reply answers); '' when empty."""
    context = pa.concat_arrays(context.chunks) if isinstance(context, pa.ChunkedArray) else context
    flat, offsets = context.flatten(), np.asarray(context.offsets)
    offsets = offsets - offsets[0]  # a sliced array's offsets do not start at 0; flatten() does
    lengths = np.diff(offsets)
    last = flat.take(pa.array(np.maximum(offsets[1:] - 1, 0))) if len(flat) else pa.nulls(len(context), pa.string())
    return pc.if_else(pa.array(lengths > 0), last, "")


def flat_unacceptable(rows: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Every row's known unacceptable replies: (texts, severities scaled to [0, 1], offsets per row)."""
    column = rows.column("unacceptable_responses").combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # an empty table has no chunks to combine
        column = pa.array([], type=column.type)
    flat = column.flatten()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    # MIC's violation-severity is 1 (fine) ... 5 (worst); /5 keeps a mild violation above zero.
    severity = np.clip(np.asarray(flat.field("severity").fill_null(3), dtype=np.float32) / 5, 0, 1)
    return flat.field("text"), severity, offsets


class Items:
    """Every text of one split that can be a positive or a negative, in segments appended in turn.

    `key` gives equal ids to texts that are equal after whitespace/case normalisation, which is how
    the miner compares a negative with the positive and with the group's other negatives.
    """

    def __init__(self):
        self._texts: list[pa.Array] = []
        self._severity: list[np.ndarray] = []
        self.size = 0

    def add(self, texts: pa.Array, severity: np.ndarray) -> np.ndarray:
        """Append a segment; return the item ids it got."""
        texts = texts.cast(pa.string()).fill_null("") if len(texts) else pa.array([], pa.string())
        self._texts.append(texts)
        self._severity.append(np.asarray(severity, dtype=np.float32))
        ids = np.arange(self.size, self.size + len(texts), dtype=np.int64)
        self.size += len(texts)
        return ids

    def freeze(self) -> None:
        self.text = pa.concat_arrays(self._texts) if self._texts else pa.array([], pa.string())
        self.severity = np.concatenate(self._severity) if self._severity else np.zeros(0, np.float32)
        encoded = pc.dictionary_encode(text_keys(self.text)) if self.size else None
        self.key = np.asarray(encoded.indices, dtype=np.int64) if encoded is not None else np.zeros(0, np.int64)


def dedupe_by_key(ids: np.ndarray, keys: np.ndarray, severity: np.ndarray) -> np.ndarray:
    """Keep one id per key (the most severe; the first on ties), in the original order."""
    if len(ids) == 0:
        return ids
    order = np.lexsort((np.arange(len(ids)), -severity, keys))
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    return ids[np.sort(order[first])]


# --- human-labelled replies (DiaSafety, ToxiChat) -------------------------------------------------


def context_codes(rows: pa.Table) -> np.ndarray:
    """Equal integers for rows of one corpus whose contexts are the same turns, each turn compared as
    `text_keys` compares texts; (rows,)."""
    if rows.num_rows == 0:
        return np.zeros(0, np.int64)
    context = rows.column("context").combine_chunks()
    offsets = np.asarray(context.offsets)
    turns = pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), text_keys(context.flatten()))
    key = pc.binary_join_element_wise(rows.column("corpus").combine_chunks(), pc.binary_join(turns, "\x00"), "\x01")
    return np.asarray(pc.dictionary_encode(key).indices, dtype=np.int64)


def reply_severities(rows: pa.Table, weights: dict[str, float]) -> np.ndarray:
    """`mine.reply_severity` of each row's reply as an unsafe one: offensive and agreeing with an
    offensive turn, offensive, agreeing only (ToxiChat), else unsafe for its category (DiaSafety); (rows,)."""
    offensive = np.asarray(rows.column("reply_offensive").fill_null(False), dtype=bool)
    agrees = np.asarray(rows.column("reply_agrees_offensive").fill_null(False), dtype=bool)
    chosen = np.select([offensive & agrees, offensive, agrees],
                       [weights["offensive_and_agrees"], weights["offensive"], weights["agrees_offensive"]],
                       weights["unsafe_category"])
    return np.asarray(chosen, dtype=np.float32).reshape(rows.num_rows)


@dataclasses.dataclass
class LabelledReplies:
    """What the human reply labels of one split's rows decide (`labelled_replies`)."""

    keep: np.ndarray  # (rows,) bool: the rows that are groups: no reply label, or a reply judged safe
    labelled: np.ndarray  # (kept rows,) bool: a kept row whose reply humans judged safe
    texts: pa.Array  # for each of those, the unsafe replies to its context, row by row, most severe first
    severity: np.ndarray  # (len(texts),)
    owner: np.ndarray  # (len(texts),) the kept row each belongs to
    unsafe: int  # replies humans judged unsafe (negatives only)
    no_safe_contexts: int  # labelled contexts without a reply judged safe: no group


def labelled_replies(rows: pa.Table, weights: dict[str, float]) -> LabelledReplies:
    """Split the rows with a human reply label (`reply_label`) by it: a reply judged safe stays a
    group, with the replies judged unsafe for the same context (same corpus and turns) as its own
    negatives; a reply judged unsafe is no group. Rows without a label are left as they are."""
    label = rows.column("reply_label")
    safe = np.asarray(pc.equal(label, "safe").fill_null(False), dtype=bool).reshape(rows.num_rows)
    unsafe = np.asarray(pc.equal(label, "unsafe").fill_null(False), dtype=bool).reshape(rows.num_rows)
    codes, severity = context_codes(rows), reply_severities(rows, weights)
    bad = np.flatnonzero(unsafe)
    bad = bad[np.lexsort((bad, -severity[bad], codes[bad]))]  # by context, most severe first
    kept = np.flatnonzero(~unsafe)
    owners = np.flatnonzero(safe[kept])  # positions among the kept rows
    first = np.searchsorted(codes[bad], codes[kept[owners]], "left")
    counts = np.searchsorted(codes[bad], codes[kept[owners]], "right") - first
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    chosen = bad[np.repeat(first, counts) + within]
    responses = rows.column("response").combine_chunks() if rows.num_rows else pa.array([], pa.string())
    no_safe = np.setdiff1d(codes[unsafe], codes[safe])
    return LabelledReplies(~unsafe, safe[kept], responses.take(pa.array(chosen, pa.int64())), severity[chosen],
                           np.repeat(owners, counts), int(unsafe.sum()), len(no_safe))


# --- retrieval ------------------------------------------------------------------------------------


def top_k_sparse(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` highest positive entries of each row of a sparse matrix, best first.

    Ties go to the lower column. Returns (columns, values), both (rows, k); missing entries are
    column -1 and value 0.
    """
    scores = scores.tocsr()
    scores.eliminate_zeros()
    scores.sort_indices()
    n_rows = scores.shape[0]
    columns = np.full((n_rows, k), -1, dtype=np.int64)
    values = np.zeros((n_rows, k), dtype=np.float32)
    lengths = np.diff(scores.indptr)
    rows = np.repeat(np.arange(n_rows), lengths)
    order = np.lexsort((scores.indices, -scores.data, rows))
    rank = np.arange(len(order)) - scores.indptr[rows[order]]
    keep = rank < k
    kept = order[keep]
    columns[rows[kept], rank[keep]] = scores.indices[kept]
    values[rows[kept], rank[keep]] = scores.data[kept]
    return columns, values


def tokenize(texts: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Lower-cased word tokens of two or more characters, English stop words removed (scikit-learn's
    default analyzer, done in Arrow). Returns (text index of each token, tokens)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    lists = pc.split_pattern_regex(pc.utf8_lower(texts.fill_null("")), pattern=r"[^\p{L}\p{N}_]+")
    tokens = lists.flatten()
    rows = np.repeat(np.arange(len(lists)), np.asarray(pc.list_value_length(lists).fill_null(0)))
    keep = pc.and_(pc.greater_equal(pc.utf8_length(tokens), 2),
                   pc.invert(pc.is_in(tokens, value_set=pa.array(sorted(ENGLISH_STOP_WORDS)))))
    return rows[np.asarray(keep, dtype=bool)], tokens.filter(keep)


class TfidfIndex:
    """TF-IDF vectors (sublinear tf, smoothed idf, l2-normalised rows: scikit-learn's TfidfVectorizer
    with `sublinear_tf=True`) over a vocabulary fitted on the pool; vectorised end to end, because the
    queries are every context of a corpus."""

    def __init__(self, texts: pa.Array):
        rows, tokens = tokenize(texts)
        self.vocabulary = pc.unique(tokens)
        ids = np.asarray(pc.index_in(tokens, value_set=self.vocabulary), dtype=np.int64)
        counts = self._counts(rows, ids, len(texts))
        document_frequency = np.bincount(counts.indices, minlength=len(self.vocabulary))
        self.idf = (np.log((1 + len(texts)) / (1 + document_frequency)) + 1).astype(np.float32)
        self.matrix = self._weigh(counts)

    def _counts(self, rows: np.ndarray, ids: np.ndarray, n: int):
        from scipy.sparse import csr_matrix

        counts = csr_matrix((np.ones(len(ids), np.float32), (rows, ids)), shape=(n, len(self.vocabulary)))
        counts.sum_duplicates()
        return counts

    def _weigh(self, counts):
        counts.data = (1 + np.log(counts.data)) * self.idf[counts.indices]
        rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        norms = np.sqrt(np.bincount(rows, weights=counts.data.astype(np.float64) ** 2, minlength=counts.shape[0]))
        counts.data = (counts.data / norms[rows]).astype(np.float32)
        return counts

    def transform(self, texts: pa.Array):
        """(len(texts), vocabulary) TF-IDF rows; words outside the pool's vocabulary are ignored."""
        rows, tokens = tokenize(texts)
        ids = pc.index_in(tokens, value_set=self.vocabulary)
        known = np.asarray(pc.is_valid(ids), dtype=bool)
        return self._weigh(self._counts(rows[known], np.asarray(ids.filter(known), dtype=np.int64), len(texts)))


class HardRetriever:
    """Unsafe texts ranked by TF-IDF cosine similarity to a context times their severity; `texts` are
    what each is matched by (itself, or the turn an unsafe reply answered)."""

    def __init__(self, texts: pa.Array, severity: np.ndarray, dialogue: np.ndarray):
        from scipy.sparse import diags

        self.size, self.dialogue = len(texts), dialogue
        if self.size == 0:
            return
        self.index = TfidfIndex(texts)
        # Scaling each pool row by its severity makes one sparse product rank by similarity x severity.
        self.pool_t = (diags(severity.astype(np.float32)) @ self.index.matrix).T.tocsr()

    def query(self, texts: pa.Array, dialogue: np.ndarray, k: int) -> np.ndarray:
        """(len(texts), k) pool indices, best first, -1 where none; items of the same dialogue are
        excluded (a dialogue's own turns are not negatives for it)."""
        result = np.full((len(texts), k), -1, dtype=np.int64)
        if self.size == 0 or len(texts) == 0:
            return result
        step = max(1, min(len(texts), PRODUCT_BUDGET // self.size))
        for start in range(0, len(texts), step):
            queries = self.index.transform(texts.slice(start, step))
            scores = (queries @ self.pool_t).tocsr()
            rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
            scores.data[self.dialogue[scores.indices] == dialogue[start:start + step][rows]] = 0
            result[start:start + step] = top_k_sparse(scores, k)[0]
        return result


# --- the worker -----------------------------------------------------------------------------------


def not_casual(scorer: Scorer, texts: list[str], contexts: list[list[str]] | None = None) -> np.ndarray:
    """1 - P(casual) per text, as float32."""
    if not texts:
        return np.zeros(0, dtype=np.float32)
    probs = np.asarray(scorer.predict_proba(texts, contexts=contexts), dtype=np.float64)
    if probs.shape != (len(texts), 3):
        raise DataError(f"safety classifier returned probabilities of shape {probs.shape}, expected ({len(texts)}, 3)")
    return np.clip(1 - probs[:, 0], 0, 1).astype(np.float32)


def dialogue_codes(*tables: pa.Table) -> list[np.ndarray]:
    """Integer ids of (corpus, dialogue_id), shared across the tables."""
    lengths = [t.num_rows for t in tables]
    if sum(lengths) == 0:
        return [np.zeros(0, np.int64) for _ in tables]

    def codes(name: str) -> np.ndarray:
        column = pa.chunked_array([c for t in tables for c in t.column(name).chunks], pa.string())
        return np.asarray(pc.dictionary_encode(column.combine_chunks()).indices, dtype=np.int64)

    corpus, dialogue = codes("corpus"), codes("dialogue_id")
    return np.split(corpus * (dialogue.max() + 1) + dialogue, np.cumsum(lengths)[:-1])


@dataclasses.dataclass
class Pools:
    """One split's candidate negatives, by source, as ids into `items` (built by `build_pools`)."""

    items: Items
    positive_ids: np.ndarray  # (rows,) each row's positive; also the pool of random replies
    context_ids: np.ndarray  # each row's own known unacceptable replies, row by row, most severe first
    context_offsets: np.ndarray  # (rows + 1,) row r's are context_ids[offsets[r]:offsets[r + 1]]
    hard_pool: np.ndarray  # the distinct unsafe texts of the adversarial corpora
    retriever: HardRetriever  # over hard_pool
    reply_pool: np.ndarray  # the distinct replies humans labelled unsafe: the `hard` source of labelled rows
    reply_retriever: HardRetriever  # over reply_pool, by the turn each reply answered
    generated_ids: np.ndarray  # flagged stage-1 samples, row by row, most unacceptable first
    generated_offsets: np.ndarray  # (rows + 1,)
    generated_stats: dict

    def sizes(self) -> dict[str, int]:
        return {"context": len(self.context_ids), "hard": len(self.hard_pool), "hard_replies": len(self.reply_pool),
                "random": len(self.positive_ids), "generated": len(self.generated_ids)}


def add_context_negatives(items: Items, rows: pa.Table, replies: LabelledReplies) -> tuple[np.ndarray, np.ndarray]:
    """`context`: each row's own known unacceptable replies (MIC's RoT violations, the replies humans
    labelled unsafe for the same context), most severe first; (ids, offsets per row)."""
    texts, severity, offsets = flat_unacceptable(rows)
    owner = np.concatenate([np.repeat(np.arange(rows.num_rows), np.diff(offsets)), replies.owner])
    severity = np.concatenate([severity, replies.severity])
    ids = items.add(pa.concat_arrays([texts.cast(pa.string()), replies.texts.cast(pa.string())]), severity)
    offsets = np.zeros(rows.num_rows + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(owner, minlength=rows.num_rows))
    return ids[np.lexsort((ids, -severity, owner))], offsets


def add_hard_texts(items: Items, pool_rows: pa.Table, pool_dialogue: np.ndarray,
                   config: MineConfig) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
    """`hard` candidates: unsafe ProsocialDialog utterances (the labelled last turn, weighted by
    `mine.label_severity`) and RoT-violating MIC answers, each matched by its own words, and replies
    humans labelled unsafe (weighted by `mine.reply_severity`), matched by the turn they answered.
    Returns (ids, the text each is matched by, the dialogue code of each, whether it is a labelled reply)."""
    labels = pool_rows.column("safety_label").to_pylist()
    weight = np.array([config.label_severity.get(label, -1.0) for label in labels], dtype=np.float32)
    unsafe = np.flatnonzero(weight >= 0)
    turns = last_turns(pool_rows.column("context"))
    utterances = turns.take(pa.array(unsafe, pa.int64()))
    labelled = items.add(utterances, weight[unsafe])
    mic_texts, mic_severity, mic_offsets = flat_unacceptable(pool_rows)
    mic = items.add(mic_texts, mic_severity)
    bad = np.flatnonzero(np.asarray(pc.equal(pool_rows.column("reply_label"), "unsafe").fill_null(False), dtype=bool)
                         .reshape(pool_rows.num_rows))
    responses = pool_rows.column("response").combine_chunks() if pool_rows.num_rows else pa.array([], pa.string())
    replies = items.add(responses.take(pa.array(bad, pa.int64())),
                        reply_severities(pool_rows, config.reply_severity)[bad])
    keys = pa.concat_arrays([utterances.cast(pa.string()), mic_texts.cast(pa.string()),
                             turns.take(pa.array(bad, pa.int64())).cast(pa.string())])
    dialogue = np.concatenate([pool_dialogue[unsafe], np.repeat(pool_dialogue, np.diff(mic_offsets)),
                               pool_dialogue[bad]])
    is_reply = np.concatenate([np.zeros(len(labelled) + len(mic), bool), np.ones(len(replies), bool)])
    return np.concatenate([labelled, mic, replies]), keys, dialogue, is_reply


def build_pools(rows: pa.Table, pool_rows: pa.Table, pool_dialogue: np.ndarray, config: MineConfig, scorer: Scorer,
                generate: Generate | None, replies: LabelledReplies) -> Pools:
    """Every candidate of one split: the rows' positives and own bad replies (`replies`: those humans
    labelled unsafe for the same context), the adversarial pool's unsafe texts (deduplicated, indexed
    for retrieval; its human-labelled unsafe replies once more on their own), the stage-1 samples when
    `generate` is given, and the random replies' severities from the classifier."""
    items = Items()
    n_rows = rows.num_rows
    positive_ids = items.add(rows.column("response").combine_chunks(), np.zeros(n_rows))
    context_ids, context_offsets = add_context_negatives(items, rows, replies)
    hard_ids, hard_keys, hard_dialogue, hard_is_reply = add_hard_texts(items, pool_rows, pool_dialogue, config)
    generated_ids, generated_offsets, generated_stats = np.zeros(0, np.int64), np.zeros(n_rows + 1, np.int64), {}
    if generate is not None and n_rows:
        generated_ids, generated_offsets, generated_stats = sample_generated(rows, config, scorer, generate, items)
    items.freeze()

    def retrievable(candidates: np.ndarray) -> tuple[np.ndarray, HardRetriever]:
        """The distinct texts among hard_ids[candidates] (the most severe copy) and their retriever."""
        keep = dedupe_by_key(candidates, items.key[hard_ids[candidates]], items.severity[hard_ids[candidates]])
        return hard_ids[keep], HardRetriever(hard_keys.take(pa.array(keep, pa.int64())),
                                             items.severity[hard_ids[keep]], hard_dialogue[keep])

    hard_pool, retriever = retrievable(np.arange(len(hard_ids)))
    reply_pool, reply_retriever = retrievable(np.flatnonzero(hard_is_reply))

    # random: severity from the classifier, scored once per distinct reply, floored at random_severity.
    _, first, inverse = np.unique(items.key[positive_ids], return_index=True, return_inverse=True)
    distinct = items.text.take(pa.array(positive_ids[first])).to_pylist()
    items.severity[positive_ids] = np.maximum(not_casual(scorer, distinct)[inverse], config.random_severity)
    return Pools(items, positive_ids, context_ids, context_offsets, hard_pool, retriever, reply_pool, reply_retriever,
                 generated_ids, generated_offsets, generated_stats)


def hard_candidates(pools: Pools, queries: pa.Array, row_dialogue: np.ndarray, labelled: np.ndarray,
                    k: int) -> np.ndarray:
    """(rows, k) item ids of the `hard` source, best first, -1 for none: from the human-labelled unsafe
    replies for `labelled` rows (by the turns they answered), from every unsafe text for the others."""
    found = np.full((len(queries), k), -1, dtype=np.int64)
    for pool, retriever, chosen in ((pools.hard_pool, pools.retriever, ~labelled),
                                    (pools.reply_pool, pools.reply_retriever, labelled)):
        index = np.flatnonzero(chosen)
        if len(index) and len(pool):
            hits = retriever.query(queries.take(pa.array(index, pa.int64())), row_dialogue[index], k)
            found[index] = np.where(hits >= 0, pool[np.maximum(hits, 0)], -1)
    return found


def candidate_matrix(pools: Pools, queries: pa.Array, row_dialogue: np.ndarray, labelled: np.ndarray, start: int,
                     stop: int, config: MineConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows start..stop's candidates: (matrix (rows, columns) of item ids, -1 for none, the columns
    grouped by source in `MINE_SOURCES` order and best first within a source; source_of (columns,)).
    `labelled` (rows,): rows whose reply humans judged safe (see `hard_candidates`)."""
    items, positive_ids = pools.items, pools.positive_ids
    # random: replies of other dialogues, the most unacceptable first
    drawn = positive_ids[rng.integers(0, len(positive_ids), size=(stop - start, config.random_candidates))]
    drawn[row_dialogue[drawn - positive_ids[0]] == row_dialogue[start:stop, None]] = -1
    order = np.argsort(-np.where(drawn >= 0, items.severity[drawn], -1.0), axis=1, kind="stable")
    drawn = np.take_along_axis(drawn, order, axis=1)
    hard = hard_candidates(pools, queries.slice(start, stop - start), row_dialogue[start:stop], labelled[start:stop],
                           config.hard_candidates)
    candidates = [pad_ragged(pools.context_ids, pools.context_offsets[start:stop + 1]), hard, drawn,
                  pad_ragged(pools.generated_ids, pools.generated_offsets[start:stop + 1])]
    source_of = np.concatenate([np.full(c.shape[1], s) for s, c in enumerate(candidates)])
    return np.concatenate(candidates, axis=1), source_of


class Tally:
    """The negatives one split's chunks chose and what their sources lacked, summed."""

    def __init__(self):
        self.kept: list[np.ndarray] = []  # row indices of the complete groups
        self.chosen: list[np.ndarray] = []  # their negatives' item ids, `n - 1` per group, in order
        self.sources: list[np.ndarray] = []  # the source index of each
        self.quota = self.shortfall = self.filled = np.zeros(len(MINE_SOURCES), np.int64)
        self.with_shortfall = 0

    def add(self, start: int, matrix: np.ndarray, source_of: np.ndarray, take: np.ndarray, complete: np.ndarray,
            quotas: np.ndarray, shortfall: np.ndarray, filled: np.ndarray) -> None:
        """One chunk's `select_negatives` result, its rows starting at `start`; only complete rows count."""
        self.kept.append(start + np.flatnonzero(complete))
        self.chosen.append(matrix[take])
        self.sources.append(np.broadcast_to(source_of, take.shape)[take])
        self.quota = self.quota + quotas[complete].sum(0)
        self.shortfall = self.shortfall + shortfall[complete].sum(0)
        self.filled = self.filled + filled[complete].sum(0)
        self.with_shortfall += int((shortfall[complete] > 0).any(1).sum())

    def joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept rows, chosen item ids, their sources), each one array."""
        join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        return join(self.kept), join(self.chosen), join(self.sources)


def mine_split(rows: pa.Table, pool_rows: pa.Table, config: MineConfig, stage: int, split: str, scorer: Scorer,
               generate: Generate | None = None, progress: bool = False) -> tuple[pa.Table, dict]:
    """Mine one split's groups (the pure worker).

    `rows`: the stage's NORMALIZED rows of this split (each becomes a group); `pool_rows`: the
    adversarial corpora's rows of the same split, the source of hard negatives; `generate`: the
    stage-1 sampler, used when the `generated` source has a share in stage 2. Returns a GROUPS table
    (input order, skipped contexts left out) and this split's statistics.
    """
    from tqdm import tqdm

    rng = np.random.default_rng([config.seed, stage, SPLITS.index(split)])
    shares = config.shares(stage)
    replies = labelled_replies(rows, config.reply_severity)
    rows = rows.filter(pa.array(replies.keep))
    n_rows, slots = rows.num_rows, config.n - 1
    row_dialogue, pool_dialogue = dialogue_codes(rows, pool_rows)
    sampled = generate if stage == 2 and config.generated and shares["generated"] > 0 else None
    pools = build_pools(rows, pool_rows, pool_dialogue, config, scorer, sampled, replies)

    queries = last_turns(rows.column("context"))
    has_context = np.asarray(pc.list_value_length(rows.column("context")).fill_null(0)) > 0
    positive_key = pools.items.key[pools.positive_ids]
    pvals = np.array([shares[s] for s in MINE_SOURCES])
    tally, exhausted = Tally(), 0
    for start in tqdm(range(0, n_rows, ROW_CHUNK), desc=f"mine stage {stage} {split}", unit="chunk",
                      disable=not progress):
        stop = min(start + ROW_CHUNK, n_rows)
        quotas = rng.multinomial(slots, pvals, size=stop - start)  # (rows, sources)
        quotas[replies.labelled[start:stop]] = LABELLED_QUOTA * slots  # their own context first, then `hard`
        matrix, source_of = candidate_matrix(pools, queries, row_dialogue, replies.labelled, start, stop, config, rng)
        take, complete, shortfall, filled = select_negatives(matrix, source_of, quotas, pools.items.key,
                                                             positive_key[start:stop])
        exhausted += int((~complete & has_context[start:stop]).sum())
        complete &= has_context[start:stop]
        tally.add(start, matrix, source_of, take & complete[:, None], complete, quotas, shortfall, filled)

    kept_rows, chosen_items, chosen_sources = tally.joined()
    kept, capped = capped_groups(np.asarray(rows.column("corpus").to_pylist(), dtype=object)[kept_rows],
                                 config.max_groups(stage, split), [config.seed, stage, SPLITS.index(split), 4])
    per_group = np.repeat(kept, slots)  # each kept group's n - 1 negatives
    kept_rows, chosen_items, chosen_sources = kept_rows[kept], chosen_items[per_group], chosen_sources[per_group]
    table = groups_table(rows, kept_rows, chosen_items, chosen_sources, pools.items, slots)
    skipped = {SKIP_EXHAUSTED: exhausted, SKIP_EMPTY_CONTEXT: int((~has_context).sum()),
               SKIP_NO_SAFE_REPLY: replies.no_safe_contexts}
    stats = split_stats(table, tally, pools, {reason: n for reason, n in skipped.items() if n}, chosen_items,
                        chosen_sources)
    stats["human_labelled"] = {"safe": int(replies.labelled.sum()), "unsafe": replies.unsafe}
    if capped:
        stats["capped"] = capped
    return table, stats


def capped_groups(corpus: np.ndarray, cap: int, seed: list[int]) -> tuple[np.ndarray, dict[str, int]]:
    """Which of the mined groups to keep, given each one's corpus: at most `cap` per corpus (0: all), a
    sample drawn with `seed` (its own stream, so a cap changes no negative), kept in their order.

    Returns a (groups,) bool mask and, per corpus that had more than `cap` groups, how many it had.
    """
    keep = np.ones(len(corpus), dtype=bool)
    if cap == 0:
        return keep, {}
    rng = np.random.default_rng(seed)
    capped = {}
    for name in sorted(set(corpus.tolist())):
        rows = np.flatnonzero(corpus == name)
        if len(rows) > cap:
            keep[rows] = False
            keep[rng.choice(rows, size=cap, replace=False)] = True
            capped[name] = len(rows)
    return keep, capped


def split_stats(table: pa.Table, tally: Tally, pools: Pools, skipped: dict[str, int], chosen_items: np.ndarray,
                chosen_sources: np.ndarray) -> dict:
    """One split's stats.json entry (see the module docstring); `chosen_items` and `chosen_sources` are
    the negatives of the groups written (after `mine.stage<k>_max_groups`), the tally's quotas and
    shortfalls those of every complete group mined."""
    chosen_severity = pools.items.severity[chosen_items]
    per_source = lambda counts: dict(zip(MINE_SOURCES, np.asarray(counts).astype(int).tolist()))  # noqa: E731
    return {
        "contexts": len(pools.positive_ids),
        "groups": table.num_rows,
        "groups_with_shortfall": tally.with_shortfall,
        "groups_per_corpus": dict(sorted(Counter(table.column("corpus").to_pylist()).items())),
        "skipped": dict(sorted(skipped.items())),
        "negatives_per_source": per_source(np.bincount(chosen_sources, minlength=len(MINE_SOURCES))),
        "quota_per_source": per_source(tally.quota),
        "shortfall_per_source": per_source(tally.shortfall),
        "filled_beyond_quota_per_source": per_source(tally.filled),
        "mean_severity_per_source": {
            s: round(float(chosen_severity[chosen_sources == i].mean()), 4)
            for i, s in enumerate(MINE_SOURCES) if (chosen_sources == i).any()
        },
        "pool_sizes": pools.sizes(),
        **({"generated": pools.generated_stats} if pools.generated_stats else {}),
    }


def pad_ragged(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rows of a ragged list (`ids[offsets[r]:offsets[r + 1]]`) as a matrix padded with -1."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    if width == 0 or len(ids) == 0:
        return np.full((len(lengths), 0), -1, dtype=np.int64)
    columns = np.arange(width)
    index = np.minimum(offsets[:-1, None] + columns, len(ids) - 1)
    return np.where(columns < lengths[:, None], ids[index], -1)


def select_negatives(matrix: np.ndarray, source_of: np.ndarray, quotas: np.ndarray, key: np.ndarray,
                     positive_key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Choose every group's negatives at once.

    `matrix`: (rows, columns) candidate item ids, -1 for none, the columns grouped by source
    (`source_of`: (columns,) source index, `MINE_SOURCES` order), best first within a source;
    `quotas`: (rows, sources) slots per source; `key`: item id -> text key;
    `positive_key`: (rows,). A candidate is usable unless its text equals the positive or a text
    offered before it in the row (an earlier source, or earlier in the same source). Each source
    gives its quota plus what the sources before it could not; what is still missing after the last
    source is taken from the sources' leftovers, first source first (the next source after the last
    is the first).

    Returns (take (rows, columns) bool, complete (rows,) bool,
    shortfall (rows, sources): what each source was asked for but could not give, filled (rows,
    sources): what each source gave beyond its quota). Rows that are not complete take nothing.
    """
    n_rows, n_columns = matrix.shape
    keys = np.where(matrix >= 0, key[np.maximum(matrix, 0)], -1 - np.arange(n_columns))  # invalid: unique < 0
    order = np.argsort(keys, axis=1, kind="stable")
    ordered = np.take_along_axis(keys, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    duplicate = np.zeros_like(repeat)
    np.put_along_axis(duplicate, order, repeat, axis=1)
    usable = (matrix >= 0) & ~duplicate & (keys != positive_key[:, None])

    n_sources = quotas.shape[1]
    available = np.stack([usable[:, source_of == s].sum(1) for s in range(n_sources)], axis=1)
    got = np.zeros_like(available)
    shortfall, filled = np.zeros_like(available), np.zeros_like(available)
    carry = np.zeros(n_rows, dtype=available.dtype)
    for s in range(n_sources):
        want = quotas[:, s] + carry
        got[:, s] = np.minimum(want, available[:, s])
        filled[:, s] = np.maximum(0, got[:, s] - quotas[:, s])
        carry = want - got[:, s]
        shortfall[:, s] = carry
    for s in range(n_sources):
        extra = np.minimum(available[:, s] - got[:, s], carry)
        got[:, s] += extra
        filled[:, s] += extra
        carry -= extra
    complete = carry == 0

    take = np.zeros_like(usable)
    for s in range(n_sources):
        columns = source_of == s
        rank = np.cumsum(usable[:, columns], axis=1)  # 1-based rank among the source's usable candidates
        take[:, columns] = usable[:, columns] & (rank <= got[:, s][:, None])
    take &= complete[:, None]
    return take, complete, shortfall, filled


def sample_generated(rows: pa.Table, config: MineConfig, scorer: Scorer, generate: Generate,
                     items: Items) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample `generated_k` replies per context and keep those the classifier flags (1 - P(casual) >=
    `generated_threshold`), most unacceptable first. Returns (item ids, offsets per row, stats)."""
    contexts = rows.column("context").to_pylist()
    texts, severity, owner = [], [], []
    for start in range(0, len(contexts), ROW_CHUNK):
        batch = contexts[start:start + ROW_CHUNK]
        samples = generate(batch, config.generated_k)
        if len(samples) != len(batch):
            raise DataError(f"generator returned {len(samples)} sample lists for {len(batch)} contexts")
        flat = [str(s) for per_context in samples for s in per_context]
        flat_owner = [start + i for i, per_context in enumerate(samples) for _ in per_context]
        scores = not_casual(scorer, flat, contexts=[contexts[o] for o in flat_owner])
        for text, score, o in zip(flat, scores, flat_owner):
            if score >= config.generated_threshold and text.strip():
                texts.append(text)
                severity.append(score)
                owner.append(o)
    owner_arr, severity_arr = np.array(owner, dtype=np.int64), np.array(severity, dtype=np.float32)
    order = np.lexsort((-severity_arr, owner_arr))  # by row, most unacceptable first
    ids = items.add(pa.array([texts[i] for i in order], pa.string()), severity_arr[order])
    offsets = np.zeros(len(contexts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(owner_arr, minlength=len(contexts)))
    stats = {"contexts": len(contexts), "sampled": len(contexts) * config.generated_k, "flagged": len(texts)}
    return ids, offsets, stats


def groups_table(rows: pa.Table, kept: np.ndarray, chosen: np.ndarray, sources: np.ndarray, items: Items,
                 slots: int) -> pa.Table:
    """Assemble the GROUPS table from the kept rows and their chosen negatives (`slots` per row)."""
    kept_rows = rows.take(pa.array(kept, pa.int64()))
    negatives = pa.StructArray.from_arrays(
        [items.text.take(pa.array(chosen, pa.int64())),
         pa.array(np.array(MINE_SOURCES, dtype=object)[sources] if len(sources) else [], pa.string()),
         pa.array(items.severity[chosen] if len(chosen) else [], pa.float32())],
        fields=list(NEGATIVE),
    )
    offsets = pa.array(np.arange(0, len(kept) * slots + 1, slots, dtype=np.int32))
    turn = kept_rows.column("turn_index").cast(pa.string())
    group_id = pc.binary_join_element_wise(kept_rows.column("corpus"), kept_rows.column("dialogue_id"), turn, "/")
    columns = {
        "group_id": group_id, "positive": kept_rows.column("response"),
        "negatives": pa.ListArray.from_arrays(offsets, negatives, type=GROUPS.field("negatives").type),
    }
    arrays = [columns[f.name] if f.name in columns else kept_rows.column(f.name) for f in GROUPS]
    return pa.Table.from_arrays([a.cast(f.type) for a, f in zip(arrays, GROUPS)], schema=GROUPS)


# --- replay ---------------------------------------------------------------------------------------


def replay_groups(stage1: pa.Table, share: float, config: MineConfig, split: str) -> pa.Table:
    """A seeded `share` of one split's stage-1 groups (kept in their order), copied as they are."""
    count = int(round(share * stage1.num_rows))
    rng = np.random.default_rng([config.seed, 3, SPLITS.index(split)])
    picked = np.sort(rng.choice(stage1.num_rows, size=count, replace=False)) if count else np.zeros(0, np.int64)
    return stage1.take(pa.array(picked, pa.int64()))


# --- run ------------------------------------------------------------------------------------------


def read_corpus(normalized: Path, corpus: str) -> dict[str, pa.Table]:
    """One normalized corpus's three splits, cast to NORMALIZED; a corpus without rows is an error."""
    splits = {split: read_table(normalized / corpus / f"{split}.parquet", schema=NORMALIZED,
                                missing_hint=f"run `dvc repro normalize@{corpus}` first") for split in SPLITS}
    if sum(t.num_rows for t in splits.values()) == 0:
        raise DataError(f"{normalized / corpus}: corpus {corpus} has no rows in any split")
    return splits


def read_stage1_groups(folder: Path, split: str, n: int) -> pa.Table:
    """One split's stage-1 groups, cast to GROUPS; groups of another size than `mine.n` are an error."""
    path = folder / f"{split}.parquet"
    table = read_table(path, schema=GROUPS, missing_hint="run `dvc repro mine_stage1` first")
    sizes = set(pc.list_value_length(table.column("negatives")).to_pylist())
    if sizes and sizes != {n - 1}:
        raise DataError(f"{path}: groups have {sorted(sizes)} negatives, mine.n = {n} needs {n - 1} "
                        "(re-run mine_stage1 with the same mine.n)")
    return table


def run(config: MineConfig, stage: int, normalized: Path, scorer: Scorer | Path, out: Path,
        stage1_groups: Path | None = None, generate: Generate | None = None, progress: bool = True,
        halves: Halves | None = None) -> dict:
    """Mine the three splits of `stage` from the corpora in `normalized` and write them to `out`.

    `scorer` is the safety classifier, or its folder (loaded once the inputs are known to be good);
    `generate` the stage-1 sampler, which stage 2 needs with `mine.generated` (`load_stage1_generator`);
    `halves` keeps the train rows of the judge's corpora that are the method's (`pipeline/contexts.py`),
    for the groups and for the pools of negatives alike.
    """
    if stage not in (1, 2):
        raise ConfigError(f"--stage = {stage!r} is not allowed: 1 or 2")
    if stage == 2 and config.replay > 0 and stage1_groups is None:
        raise ConfigError(f"mine.replay = {config.replay} needs --stage1-groups (the stage-1 groups to replay)")
    sampled = stage == 2 and config.generated
    if sampled and generate is None:
        raise ConfigError("mine.generated = true needs the stage-1 model's sampler (--stage1-model)")
    ensure_writable(out)
    started = time.perf_counter()
    mined = config.stage1_corpora if stage == 1 else config.stage2_corpora
    corpora = {c: read_corpus(normalized, c) for c in mined}
    adversarial = {c: corpora[c] if c in corpora else read_corpus(normalized, c) for c in config.stage1_corpora}
    halved = {}
    if halves is not None:
        for name, splits in {**corpora, **adversarial}.items():
            kept = halves.of(name, splits["train"])
            if kept.num_rows != splits["train"].num_rows:
                halved[name] = {"train_rows": splits["train"].num_rows, "method_rows": kept.num_rows}
            splits["train"] = kept
    for name, splits in {**corpora, **adversarial}.items():
        log.info("mine stage %d: read %s %s", stage, name, {split: t.num_rows for split, t in splits.items()})
    safety_model = str(scorer) if isinstance(scorer, Path) else None
    if isinstance(scorer, Path):
        scorer = load_scorer(scorer)
    stats: dict = {"stage": stage, "n": config.n, "seed": config.seed, "shares": config.shares(stage),
                   "corpora": list(mined), "pool_corpora": list(config.stage1_corpora), "safety_model": safety_model,
                   "stage1_sampler": generate.settings if sampled else None,
                   "halves": {**halves.record(), "corpora_rows": halved} if halves else None, "splits": {}}
    with staged_dir(out) as folder:
        for split in SPLITS:
            rows = pa.concat_tables([corpora[c][split] for c in mined])
            pool = pa.concat_tables([adversarial[c][split] for c in config.stage1_corpora])
            table, split_stats = mine_split(rows, pool, config, stage, split, scorer, generate if sampled else None,
                                            progress)
            if stage == 2 and config.replay > 0:
                stage1 = read_stage1_groups(stage1_groups, split, config.n)
                replayed = replay_groups(stage1, config.replay, config, split)
                table = pa.concat_tables([table, replayed])
                split_stats["replayed"] = {"groups": replayed.num_rows, "of_stage1_groups": stage1.num_rows}
            split_stats["rows_written"] = table.num_rows
            write_parquet(table, folder / f"{split}.parquet")
            stats["splits"][split] = split_stats
            log.info("mine stage %d %s: %d contexts -> %d groups (skipped %s)", stage, split,
                     split_stats["contexts"], table.num_rows, split_stats["skipped"] or "none")
        write_json(stats, folder / "stats.json")
    log.info("mine stage %d: wrote %s in %.1f s", stage, out, time.perf_counter() - started)
    return stats
