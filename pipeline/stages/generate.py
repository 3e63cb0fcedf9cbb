"""generate: RoT-annotated candidates for the test contexts of every corpus, scored and re-ranked.

Reads `data/normalized/<corpus>/test.parquet` for the six corpora, a dialog model, the safety
classifier (`models/safety`) and the RoT-agreement scorer (`models/rot_agreement`); writes
`data/candidates/<name>/<corpus>.parquet` (schema `schemas.CANDIDATES`: every candidate with its
RoT, reply, scores and rank, and which one was selected; nothing is dropped) and `stats.json`
(counts, config, provenance; the timing goes to the log).

    python -m pipeline generate stage2 --model models/stage2 --safety models/safety \
        --agreement models/rot_agreement --normalized data/normalized --out data/candidates/stage2

`<name>` is `base`, `stage1` or `stage2` (a folder written by the training stages, loaded strictly:
it must carry the dialog markers), or an entry of `audit.models` in params.yaml: a Hugging Face
model, by hub id or local folder, that gets the markers added the way `base_model` adds them. An
untuned model has never seen the RoT format, so its candidates mostly carry no RoT.

Per corpus: up to `generate.max_contexts` test contexts are drawn with the seed (the same ones for
every model), `generate.k` candidates are sampled per context in batches of `generate.batch_size`
contexts, and each batch reseeds torch from (seed, corpus, batch index), so a batch's candidates do
not depend on the batches before it. Every model is decoded with the settings in params.yaml only;
a checkpoint's own generation defaults (beam search, minimum length) are ignored.

Scores: `fluency` is the candidate's mean token log-probability under the generating model (its
eos included when it ended), `prosociality` the safety classifier's P(casual) of the reply given
the context, `agreement` the re-ranker's agreement term (`pipeline.rerank.agreement_term`: 1 -
P(the reply disagrees with its own RoT) from the RoT-agreement scorer; a candidate whose `rot` is
null has no agreement of its own and gets the neutral fill, its context's mean; null throughout
when no scorer was given, which only `generate.gamma = 0` allows), `score` the re-ranker's
combination (`pipeline.rerank`). An empty reply (nothing after `<|response|>`, e.g. a RoT that ran
to the length limit) keeps the classifier's `safety_probs` like any reply, but its prosociality is
0: saying nothing is never the prosocial choice, so any non-empty reply of equal fluency outranks it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pyarrow as pa

from pipeline.artifacts import ensure_writable, git_commit, library_versions, staged_dir, write_json, write_parquet
from pipeline.config import CORPORA, AuditModel, GenerateConfig, require
from pipeline.errors import DataError
from pipeline.modeling import DialogModel, Source
from pipeline.rerank import agreement_term, fluency_term, rerank
from pipeline.sampling import batch_seed, sample_candidates
from pipeline.schemas import CANDIDATES

log = logging.getLogger(__name__)

class SafetyScorer(Protocol):
    def predict_proba(self, responses: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """(n, 3) probabilities of casual, needs_caution, needs_intervention."""


def load_safety_scorer(path: Path) -> SafetyScorer:
    """The safety classifier written by the `safety` stage."""
    from pipeline.stages.safety import load_scorer

    return load_scorer(path)


class AgreementScorer(Protocol):
    def predict_proba(self, rots: Sequence[str], responses: Sequence[str],
                      contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """(n, 3) probabilities that each reply disagrees with, is neutral to, or agrees with its RoT."""


def load_agreement_scorer(path: Path) -> AgreementScorer:
    """The RoT-agreement scorer written by the `rot_agreement` stage."""
    from pipeline.stages.rot_agreement import load_agreement_scorer as load

    return load(path)


def agreement_scorer_for(config: GenerateConfig, path: Path | None) -> AgreementScorer | None:
    """The scorer at `path`, or None without one, which only `generate.gamma = 0` allows."""
    require(path is not None or config.gamma == 0, "generate.gamma", config.gamma,
            "must be 0 without --agreement (the RoT-agreement scorer folder, e.g. models/rot_agreement)")
    return None if path is None else load_agreement_scorer(path)


# --- models ---------------------------------------------------------------------------------------


def load_model(name: str, path: str, audit: AuditModel | None, device: str, seed: int = 0) -> DialogModel:
    """A trained entry (`audit` None) from its folder, strictly; an audit model through `base_model`'s
    loader, with the dialog markers added when it lacks them (new embedding rows seeded by `seed`)."""
    from pipeline.modeling import check_tokenizer, load_dialog_model

    if audit is None:
        return load_dialog_model(path, device)
    from pipeline.config import BaseModelConfig
    from pipeline.stages.base_model import add_dialog_tokens, load_hf

    hf_config = BaseModelConfig(kind="hf", name=path, revision=audit.revision,
                                trust_remote_code=audit.trust_remote_code)
    try:
        model, tokenizer, _ = load_hf(hf_config)
    except DataError as error:  # the loader names base_model's keys; point at the audit entry instead
        message = str(error).replace("base_model.name", f"audit.models.{name}.path")
        raise DataError(message.replace("base_model.", f"audit.models.{name}.")) from None
    added = add_dialog_tokens(model, tokenizer, seed)
    if added:
        log.info("audit model %s: added %s (it has no RoT format, so its candidates mostly lack RoTs)",
                 name, ", ".join(added))
    check_tokenizer(tokenizer, path)
    return DialogModel(model.to(device).eval(), tokenizer, bool(model.config.is_encoder_decoder), Path(path))


# --- sampling and scoring -------------------------------------------------------------------------


def safety_scores(scorer: SafetyScorer, responses: list[str], contexts: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(safety_probs (n, 3), prosociality (n,)): the classifier's three-way probabilities of each
    reply in context, and P(casual), which is 0 for an empty reply."""
    if not responses:
        return np.zeros((0, 3)), np.zeros(0)
    probs = np.asarray(scorer.predict_proba(responses, contexts), dtype=np.float64)
    if probs.shape != (len(responses), 3):
        raise DataError(f"safety classifier returned shape {probs.shape}, expected ({len(responses)}, 3)")
    empty = np.array([not r.strip() for r in responses])
    return probs, np.where(empty, 0.0, probs[:, 0])


def has_rot(rot: str | None) -> bool:
    return rot is not None and bool(rot.strip())


def agreement_scores(scorer: AgreementScorer, rots: Sequence[str | None], responses: list[str],
                     contexts: list[list[str]], groups: Sequence[str]) -> np.ndarray:
    """The agreement term of N candidates, (N,): 1 - P(disagrees) of each reply with its own RoT, and
    for a candidate without a RoT its context's neutral fill (`pipeline.rerank.agreement_term`)."""
    with_rot = [i for i, rot in enumerate(rots) if has_rot(rot)]
    not_disagrees = np.full(len(rots), np.nan)
    if with_rot:
        probs = np.asarray(scorer.predict_proba([rots[i] for i in with_rot], [responses[i] for i in with_rot],
                                                [contexts[i] for i in with_rot]), dtype=np.float64)
        if probs.shape != (len(with_rot), 3):
            raise DataError(f"RoT-agreement scorer returned shape {probs.shape}, expected ({len(with_rot)}, 3)")
        not_disagrees[with_rot] = 1.0 - probs[:, 0]
    return agreement_term(not_disagrees, groups)


# --- the worker -----------------------------------------------------------------------------------


def select_contexts(rows: list[dict], corpus: str, max_contexts: int, seed: int) -> list[dict]:
    """Up to `max_contexts` rows (0: all) drawn with a generator fixed by (seed, corpus), in file order."""
    if max_contexts == 0 or len(rows) <= max_contexts:
        return list(rows)
    rng = np.random.default_rng([seed, CORPORA.index(corpus) if corpus in CORPORA else len(CORPORA)])
    chosen = np.sort(rng.choice(len(rows), size=max_contexts, replace=False))
    return [rows[i] for i in chosen]


def context_id(corpus: str, row: dict) -> str:
    return f"{corpus}/{row['dialogue_id']}/{row['turn_index']}"


def candidates_table(dm: DialogModel, scorer: SafetyScorer, rows: list[dict], model_name: str, corpus: str,
                     config: GenerateConfig, progress: bool = True,
                     agreement_scorer: AgreementScorer | None = None) -> tuple[pa.Table, dict]:
    """Every candidate for the context `rows` of one corpus (schema `CANDIDATES`), and counts.

    The pure worker of the stage: sampling in batches of `config.batch_size` contexts, fluency,
    safety, RoT agreement (when `agreement_scorer` is given; needed when `config.gamma` > 0), the
    re-ranker; nothing is written.
    """
    require(agreement_scorer is not None or config.gamma == 0, "generate.gamma", config.gamma,
            "must be 0 without a RoT-agreement scorer")
    from tqdm.auto import tqdm

    k = config.k
    out: dict[str, list] = {name: [] for name in CANDIDATES.names}
    tokens, started = 0, time.perf_counter()
    batches = range(0, len(rows), config.batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc=f"{model_name}/{corpus}", unit="batch",
                                             disable=not progress, leave=False)):
        batch = rows[start: start + config.batch_size]
        sources = [Source(r["context"], r["persona"] or (), r["emotion"]) for r in batch]
        sampled = sample_candidates(dm, sources, config, batch_seed(config.seed, corpus, batch_index))
        tokens += sampled.tokens
        for i, row in enumerate(batch):
            for j in range(k):
                out["model"].append(model_name)
                out["corpus"].append(corpus)
                out["context_id"].append(context_id(corpus, row))
                out["dialogue_id"].append(row["dialogue_id"])
                out["turn_index"].append(row["turn_index"])
                out["context"].append(list(row["context"]))
                out["safety_label"].append(row["safety_label"])
                out["reference"].append(row["response"])
                out["reference_rots"].append(list(row["rots"] or []))
                out["candidate_index"].append(j)
                out["text"].append(sampled.texts[i * k + j])
                out["rot"].append(sampled.rots[i * k + j])
                out["response"].append(sampled.responses[i * k + j])
        out["fluency"].extend(sampled.fluency.tolist())
    seconds = time.perf_counter() - started
    probs, prosociality = safety_scores(scorer, out["response"], out["context"])
    out["safety_probs"] = probs.tolist()
    out["prosociality"] = prosociality.tolist()
    terms = {"fluency": fluency_term(out["fluency"]), "prosociality": prosociality}
    if agreement_scorer is not None:
        terms["agreement"] = agreement_scores(agreement_scorer, out["rot"], out["response"], out["context"],
                                              out["context_id"])
        out["agreement"] = terms["agreement"].tolist()
    else:
        out["agreement"] = [None] * len(out["text"])
    weights = config.weights()
    verdict = rerank(out["context_id"], out["candidate_index"], {name: terms[name] for name in weights}, weights,
                     enabled=config.rerank)
    out["score"], out["rank"], out["selected"] = verdict.score.tolist(), verdict.rank.tolist(), verdict.selected.tolist()
    table = pa.table(out, schema=CANDIDATES)
    n = len(out["text"])
    stats = {
        "contexts": len(rows),
        "candidates": n,
        "with_rot": sum(r is not None for r in out["rot"]),
        "agreement_filled": (sum(not has_rot(r) for r in out["rot"]) if agreement_scorer is not None else None),
        "empty_responses": sum(not r.strip() for r in out["response"]),
        "selected_not_first": int(sum(s and j != 0 for s, j in zip(out["selected"], out["candidate_index"]))),
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    return table, stats


# --- run ------------------------------------------------------------------------------------------


def read_test_rows(normalized: Path, corpus: str) -> list[dict]:
    """The rows of one corpus's test split; a DataError when it is missing, unreadable or empty."""
    import pyarrow.parquet as pq

    path = normalized / corpus / "test.parquet"
    if not path.is_file():
        raise DataError(f"{path}: test split not found (run the normalize stage for {corpus})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    needed = ("dialogue_id", "turn_index", "context", "response", "rots", "safety_label", "persona", "emotion")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (expected the normalized schema)")
    if table.num_rows == 0:
        raise DataError(f"{path}: the test split has no rows, so there are no contexts to generate for")
    return table.select(list(needed)).to_pylist()


def run(config: GenerateConfig, name: str, model: str, safety: Path, normalized: Path, out: Path,
        audit: AuditModel | None = None, agreement: Path | None = None) -> dict:
    """Generate, score and re-rank candidates for all six corpora; write `<out>/<corpus>.parquet` and
    `stats.json`. `audit` is the entry of an audit model (None for base, stage1, stage2); `agreement`
    the RoT-agreement scorer's folder (None: no agreement column, only with `generate.gamma = 0`)."""
    import torch

    ensure_writable(out)
    started = time.perf_counter()
    agreement_scorer = agreement_scorer_for(config, agreement)
    rows = {corpus: read_test_rows(normalized, corpus) for corpus in CORPORA}  # fail early, before loading
    scorer = load_safety_scorer(safety)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dm = load_model(name, model, audit, device, config.seed)
    dm.model.eval()
    log.info("generate %s: %s model from %s on %s, k=%d", name, "seq2seq" if dm.is_seq2seq else "causal",
             model, device, config.k)
    stats = {"model": name, "path": str(model), "architecture": "seq2seq" if dm.is_seq2seq else "causal",
             "config": dataclasses.asdict(config), "audit": dataclasses.asdict(audit) if audit else None,
             "corpora": {}, "git_commit": git_commit(), "library_versions": library_versions()}
    with staged_dir(out) as staging:
        for corpus in CORPORA:
            chosen = select_contexts(rows[corpus], corpus, config.max_contexts, config.seed)
            table, corpus_stats = candidates_table(dm, scorer, chosen, name, corpus, config,
                                                   agreement_scorer=agreement_scorer)
            write_parquet(table, staging / f"{corpus}.parquet")
            # Timing goes to the log only: stats.json is part of the output, whose bytes must not change
            # between runs (or every rerun would look like new candidates to the stages after it).
            tokens_per_second = corpus_stats.pop("tokens_per_second")
            del corpus_stats["generation_seconds"]
            stats["corpora"][corpus] = {"test_rows": len(rows[corpus]), **corpus_stats}
            log.info("generate %s/%s: %d contexts, %d candidates (%d with a RoT, %d empty), %.1f tokens/s",
                     name, corpus, corpus_stats["contexts"], corpus_stats["candidates"], corpus_stats["with_rot"],
                     corpus_stats["empty_responses"], tokens_per_second or 0)
        write_json(stats, staging / "stats.json")
    log.info("generate %s: wrote %s in %.1f s", name, out, time.perf_counter() - started)
    return stats
