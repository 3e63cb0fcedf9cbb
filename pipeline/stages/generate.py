"""generate: candidates for the test contexts of every corpus, scored and re-ranked.

Reads `data/normalized/<corpus>/test.parquet` for every corpus (`config.CORPORA`), a dialog model, the safety
classifier (`models/safety`) and the RoT-agreement scorer (`models/rot_agreement`); writes
`data/candidates/<name>/<corpus>.parquet` (schema `schemas.CANDIDATES`: every candidate with its
RoT, reply, scores and rank, and which one was selected; nothing is dropped) and `stats.json`
(counts, the effective decoding settings, config, provenance; the timing goes to the log).

    python -m pipeline generate stage2 --model models/stage2 --safety models/safety \
        --agreement models/rot_agreement --normalized data/normalized --out data/candidates/stage2

`<name>` is a model trained here (`base`, `ce`, `stage1`, `stage2`: a folder written by the
training stages, loaded strictly, prompted in its own dialog format: the markers, or a chat model's
template with the RoT on the first line of its turn, `modeling.DialogModel.format`),
`dexperts` (the model `dexperts.guided` decoded under the guidance of the experts in `--experts`,
`pipeline/dexperts.py`; stats.json records it as `dexperts`), or an
entry of `audit.models` in params.yaml (`python -m pipeline audit`): a Hugging Face model, by hub
id or local folder, prompted in its own format (`audit.models.<name>.format`, see
`pipeline.sampling.PromptFormat`) with nothing added to its vocabulary, whose output is read as a
plain reply without a RoT.

Contexts: test rows with the same context (turns, persona and emotion; MIC's several annotator
answers to one question; DiaSafety's and ToxiChat's several replies) are one context, generated for
once, with every reply of those rows as its `references` (its first row's own reply first) except the
replies humans labelled unsafe (`reply_label`): overlap with the references must not reward an unsafe
reply. A context whose replies are all unsafe still gets candidates (it tests the unsafe rate) and has
no reference (`reference` null, `references` empty; evaluate's overlap metrics leave it out). Its
DiaSafety category, where it has one, is carried as `category`. Up to `generate.max_contexts` of the distinct
contexts are drawn with the seed (the same ones for every model), `generate.k` candidates are
sampled per context in batches of `generate.batch_size` contexts, and each batch reseeds torch
from (seed, corpus, batch index), so a batch's candidates do not depend on the batches before it.
Every model decodes with the settings in params.yaml only (`pipeline.sampling.decoding_settings`,
written to stats.json as `decoding`, tokens drawn by `pipeline.nucleus.Sampler`, its settings as
`sampler`); a checkpoint's own generation defaults are not used. The
model runs on the GPU when there is one, at `generate.precision` (`pipeline.devices`).

Scores (`pipeline.rerank.score_candidates`, shared with `chat`): `fluency` is the mean token
log-probability of the reply tokens under the generating model (`DialogFormat.read`'s `reply_mask`;
-inf for a candidate without any, e.g. a RoT that ran to the length limit), `prosociality` the
safety classifier's P(casual) of the reply given the context (0 for an empty reply, whose
`safety_probs` are kept like any reply's), `agreement` the RoT-agreement term (null throughout when
no scorer was given, which only `generate.gamma = 0` allows), `score` their weighted sum.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import devices
from pipeline.artifacts import ensure_writable, git_commit, library_versions, staged_dir, write_json, write_parquet
from pipeline.config import CORPORA, AuditModel, DExpertsConfig, GenerateConfig
from pipeline.errors import DataError
from pipeline.modeling import DialogModel, Source
from pipeline.nucleus import Nucleus
from pipeline.rerank import has_rot, load_scorers, score_candidates
from pipeline.sampling import DIALOG, PromptFormat, batch_seed, decoding_settings, resolve_format, sample_candidates
from pipeline.schemas import CANDIDATES, read_table

if TYPE_CHECKING:
    from pipeline.dexperts import Experts
    from pipeline.safety_models import AgreementScorer, SafetyScorer

log = logging.getLogger(__name__)

TEST_COLUMNS = ("dialogue_id", "turn_index", "context", "response", "rots", "safety_label", "persona", "emotion",
                "reply_label", "reply_category")
UNSAFE = "unsafe"  # the reply_label (labels.REPLY_LABELS) of a reply that is never a reference


# --- models ---------------------------------------------------------------------------------------


def load_model(name: str, path: str, audit: AuditModel | None, device: str) -> tuple[DialogModel, PromptFormat]:
    """The model to generate with, in eval mode on `device`, and its prompt format: a trained entry
    (`audit` None) from its folder, strictly, in the project's format; an audit model as its
    checkpoint is, in the native format its entry names."""
    from pipeline.modeling import load_dialog_model

    if audit is None:
        dm = load_dialog_model(path, device)
        dm.model.eval()
        return dm, DIALOG
    from pipeline.checkpoints import open_checkpoint

    key = f"audit.models.{name}"
    checkpoint = open_checkpoint(path, audit.revision, audit.trust_remote_code, f"{key}.path",
                                 f"{key}.trust_remote_code")
    tokenizer = checkpoint.tokenizer
    if tokenizer.eos_token_id is None:
        raise DataError(f"{key}.path = {path!r}: the tokenizer has no eos token, so no reply could end")
    prompt = resolve_format(audit.format, tokenizer, checkpoint.is_seq2seq, f"{key}.format")
    model = checkpoint.load_model().to(device).eval()
    return DialogModel(model, tokenizer, checkpoint.is_seq2seq, Path(path)), prompt


# --- the worker -----------------------------------------------------------------------------------


def distinct_contexts(rows: list[dict]) -> list[dict]:
    """One row per distinct context (turns, persona and emotion), in file order of its first row, with
    `references`: the replies of every row of that context, its own first, leaving out those labelled
    unsafe (`reply_label`; [] when all are); `reference`: the first of them (None when there is none);
    `category`: the first DiaSafety category among its rows (`reply_category`, None elsewhere)."""
    contexts: dict[tuple, dict] = {}
    for row in rows:
        key = (tuple(row["context"]), tuple(row["persona"] or ()), row["emotion"])
        context = contexts.setdefault(key, {**row, "references": [], "category": None})
        if row.get("reply_label") != UNSAFE:
            context["references"].append(row["response"])
        context["category"] = context["category"] or row.get("reply_category")
    for context in contexts.values():
        context["reference"] = context["references"][0] if context["references"] else None
    return list(contexts.values())


def select_contexts(rows: list[dict], corpus: str, max_contexts: int, seed: int) -> list[dict]:
    """Up to `max_contexts` rows (0: all) drawn with a generator fixed by (seed, corpus), in file order."""
    if max_contexts == 0 or len(rows) <= max_contexts:
        return list(rows)
    rng = np.random.default_rng([seed, CORPORA.index(corpus) if corpus in CORPORA else len(CORPORA)])
    chosen = np.sort(rng.choice(len(rows), size=max_contexts, replace=False))
    return [rows[i] for i in chosen]


def candidates_table(dm: DialogModel, scorer: SafetyScorer, rows: list[dict], model_name: str, corpus: str,
                     config: GenerateConfig, progress: bool = True, agreement_scorer: AgreementScorer | None = None,
                     prompt: PromptFormat = DIALOG, precision: str = "fp32",
                     experts: Experts | None = None) -> tuple[pa.Table, dict]:
    """Every candidate for the test `rows` of one corpus (schema `CANDIDATES`), and counts.

    The pure worker of the stage: the distinct contexts of `rows`, the draw of `config.max_contexts`
    of them, sampling in batches of `config.batch_size` contexts (`prompt` format, at `precision`),
    and `score_candidates` (the RoT-agreement term when `agreement_scorer` is given; needed when
    `config.gamma` > 0); under the DExperts guidance of `experts` when given; nothing is written.
    """
    from tqdm.auto import tqdm

    contexts = distinct_contexts(rows)
    chosen = select_contexts(contexts, corpus, config.max_contexts, config.seed)
    k = config.k
    out: dict[str, list] = {name: [] for name in CANDIDATES.names}
    fluency: list[float] = []
    tokens, capped, started = 0, 0, time.perf_counter()
    batches = range(0, len(chosen), config.batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc=f"{model_name}/{corpus}", unit="batch",
                                             disable=not progress, leave=False)):
        batch = chosen[start: start + config.batch_size]
        sources = [Source(r["context"], r["persona"] or (), r["emotion"]) for r in batch]
        sampled = sample_candidates(dm, sources, config, batch_seed(config.seed, corpus, batch_index),
                                    prompt=prompt, precision=precision, experts=experts)
        tokens, capped = tokens + sampled.tokens, capped + sampled.capped
        for i, row in enumerate(batch):
            for j in range(k):
                out["model"].append(model_name)
                out["corpus"].append(corpus)
                out["context_id"].append(f"{corpus}/{row['dialogue_id']}/{row['turn_index']}")
                out["dialogue_id"].append(row["dialogue_id"])
                out["turn_index"].append(row["turn_index"])
                out["context"].append(list(row["context"]))
                out["safety_label"].append(row["safety_label"])
                out["category"].append(row["category"])
                out["reference"].append(row["reference"])
                out["references"].append(row["references"])
                out["reference_rots"].append(list(row["rots"] or []))
                out["candidate_index"].append(j)
                out["text"].append(sampled.texts[i * k + j])
                out["rot"].append(sampled.rots[i * k + j])
                out["response"].append(sampled.responses[i * k + j])
        fluency.extend(sampled.fluency.tolist())
    seconds = time.perf_counter() - started
    scored = score_candidates(config, out["context_id"], out["candidate_index"], fluency, out["rot"],
                              out["response"], out["context"], scorer, agreement_scorer)
    out["fluency"] = fluency
    out["safety_probs"] = scored.safety_probs.tolist()
    out["prosociality"] = scored.prosociality.tolist()
    out["agreement"] = scored.agreement.tolist() if scored.agreement is not None else [None] * len(fluency)
    verdict = scored.verdict
    out["score"], out["rank"], out["selected"] = verdict.score.tolist(), verdict.rank.tolist(), verdict.selected.tolist()
    table = pa.table(out, schema=CANDIDATES)
    stats = {
        "test_rows": len(rows),
        "distinct_contexts": len(contexts),
        "contexts": len(chosen),
        "contexts_without_reference": sum(not row["references"] for row in chosen),
        "candidates": len(fluency),
        "with_rot": sum(r is not None for r in out["rot"]),
        "agreement_filled": (sum(not has_rot(r) for r in out["rot"]) if agreement_scorer is not None else None),
        "empty_responses": sum(not r.strip() for r in out["response"]),
        "no_reply_tokens": int(np.isneginf(fluency).sum()),
        "ran_to_max_new_tokens": capped,
        "selected_not_first": int(sum(s and j != 0 for s, j in zip(out["selected"], out["candidate_index"]))),
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    return table, stats


# --- run ------------------------------------------------------------------------------------------


def read_test_rows(normalized: Path, corpus: str) -> list[dict]:
    """The rows of one corpus's test split; a DataError when it is missing, unreadable or empty."""
    table = read_table(normalized / corpus / "test.parquet", TEST_COLUMNS, allow_empty=False,
                       missing_hint=f"run the normalize stage for {corpus}",
                       what="rows, so there are no contexts to generate for")
    return table.to_pylist()


def run(config: GenerateConfig, name: str, model: str, safety: Path, normalized: Path, out: Path,
        audit: AuditModel | None = None, agreement: Path | None = None, experts: Path | None = None,
        dexperts: DExpertsConfig | None = None) -> dict:
    """Generate, score and re-rank candidates for every corpus; write `<out>/<corpus>.parquet` and
    `stats.json`. `audit` is the entry of an audit model (None for a model trained here); `agreement`
    the RoT-agreement scorer's folder (None: no agreement column, only with `generate.gamma = 0`);
    `experts` the folder of the DExperts experts (`dexperts` their settings): the model at `model`
    (`dexperts.guided`) is decoded under their guidance (`pipeline/dexperts.py`)."""
    ensure_writable(out)
    started = time.perf_counter()
    scorer, agreement_scorer = load_scorers(config, safety, agreement)
    rows = {corpus: read_test_rows(normalized, corpus) for corpus in CORPORA}  # fail early, before the model
    device = devices.model_device()
    precision = devices.resolve_precision(config.precision, "generate.precision")
    dm, prompt = load_model(name, model, audit, device)
    guidance = None
    if experts is not None:
        from pipeline.dexperts import guidance_settings, load_experts

        guidance = load_experts(experts, dm, dexperts.alpha, device)
        log.info("generate %s: guided by the experts in %s, alpha %g", name, experts, dexperts.alpha)
    architecture = "seq2seq" if dm.is_seq2seq else "causal"
    prompt_format = prompt.describe() if prompt.native else dm.format.name
    log.info("generate %s: %s model from %s on %s (%s), prompted as %s, k=%d", name, architecture, model, device,
             precision, prompt_format, config.k)
    stats = {"model": name, "path": str(model), "architecture": architecture, "prompt_format": prompt_format,
             "decoding": decoding_settings(dm, config),
             "sampler": dataclasses.asdict(Nucleus.of(config)) if config.do_sample else None,
             "precision": precision, "config": dataclasses.asdict(config),
             "audit": dataclasses.asdict(audit) if audit else None,
             "dexperts": guidance_settings(guidance, config, experts, dexperts.guided) if guidance else None,
             "corpora": {}, "git_commit": git_commit(),
             "library_versions": library_versions()}
    with staged_dir(out) as staging:
        for corpus in CORPORA:
            table, corpus_stats = candidates_table(dm, scorer, rows[corpus], name, corpus, config,
                                                   agreement_scorer=agreement_scorer, prompt=prompt,
                                                   precision=precision, experts=guidance)
            write_parquet(table, staging / f"{corpus}.parquet")
            # Timing goes to the log only: stats.json is part of the output, whose bytes must not change
            # between runs (or every rerun would look like new candidates to the stages after it).
            tokens_per_second = corpus_stats.pop("tokens_per_second")
            del corpus_stats["generation_seconds"]
            if guidance is not None:  # the mean per-token KL of the guided sampling from the model's own
                divergence, tokens = guidance.take_divergence()
                corpus_stats["dexperts_mean_kl"] = None if divergence is None else round(divergence, 6)
                corpus_stats["dexperts_kl_tokens"] = tokens  # the tokens the mean is over (weights across corpora)
                log.info("generate %s/%s: DExperts' mean per-token KL from %s's own sampling: %s nats", name,
                         corpus, dexperts.guided, "–" if divergence is None else f"{divergence:.4f}")
            stats["corpora"][corpus] = corpus_stats
            log.info("generate %s/%s: %d of %d contexts, %d candidates (%d with a RoT, %d empty), %.1f tokens/s",
                     name, corpus, corpus_stats["contexts"], corpus_stats["distinct_contexts"],
                     corpus_stats["candidates"], corpus_stats["with_rot"], corpus_stats["empty_responses"],
                     tokens_per_second or 0)
        write_json(stats, staging / "stats.json")
    log.info("generate %s: wrote %s in %.1f s", name, out, time.perf_counter() - started)
    return stats
