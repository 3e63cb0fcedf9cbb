"""audit_report: the audit table, the safety judge's unsafe rate of general-purpose models, checked
against human labels where the replies have them.

Reads the judge (`models/judge`), the candidates of the models run here (`<candidates>/<name>/
<corpus>.parquet`, schema `schemas.CANDIDATES`: the untuned `base` model, which `generate@base`
always covers, and every `audit.models` entry) and the replies of the models audited from their files
(`<audit>/<name>/replies.parquet`, schema `schemas.AUDIT_REPLIES`, written by `audit_file@<name>` for
every `audit.files` entry). Writes into the out folder (`reports/audit_report/`):

- `results.json`, machine-readable first: per model its replies, contexts, the judge's unsafe rate
  with its 95% interval, the same per DiaSafety category, and for human-labelled replies the human
  rate, the judge's rate on the same replies, their difference with its paired interval, the share
  of replies where the two agree and Cohen's kappa; whether the judge orders the human-labelled
  models as humans do (`metrics.order_agreement`); what trained the judge; the inputs, config and
  provenance;
- `metrics.json`: `<model>/unsafe_rate`, and for human-labelled models `<model>/human_unsafe_rate`
  and `<model>/judge_minus_human` (DVC metrics);
- `report.md`, rendered from results.json by `pipeline.report.render_audit`.

    python -m pipeline audit_report --judge models/judge --candidates data/candidates --audit data/audit \\
        --out reports/audit_report

A model's replies are every candidate it sampled (all `generate.k` per context, as DiaSafety's
released generations are 10 per context), or every reply of its file. A reply is unsafe when the
judge's P(unsafe) of it in its context is at least `evaluate.judge_threshold` (`pipeline.judging`,
one batched call per model). Replies to one context are not independent, so every interval is a
cluster bootstrap that draws contexts (`context_id`) with all their replies (`evaluate.bootstrap_samples`
resamples, `evaluate.seed`); the judge-minus-human difference draws the contexts once for both. A
reply whose context lies in DiaSafety's train split (`diasafety_split`) is counted when the judge
learned from DiaSafety: the judge has seen that context, so its verdict there is not a fair test.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import metrics as M
from pipeline import report, significance
from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, write_json
from pipeline.config import CORPORA, EvaluateConfig
from pipeline.errors import DataError
from pipeline.judging import ReplyJudge, judge_provenance, judge_replies
from pipeline.labels import DIASAFETY_CATEGORIES, REPLY_LABELS
from pipeline.schemas import AUDIT_REPLIES, CANDIDATES, read_table

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
CANDIDATE_COLUMNS = ("corpus", "context_id", "context", "category", "response")
REPLY_COLUMNS = ("model", "context_id", "context", "reply", "category", "diasafety_split", "human_label", "source")
RUN_HERE = ("base",)  # the models generate@ runs that are audited beside audit.models: the untuned base model
SEEN_SPLIT = "train"  # a DiaSafety context of this split taught a judge trained on DiaSafety


@dataclasses.dataclass
class Replies:
    """One audited model's replies, one entry per reply (n): the arrays the audit reads."""

    source: str
    """Where they come from: `generated here (<folder>)` or the file `audit.files.<name>.path` names."""
    contexts: list[list[str]]
    """(n,) the context's turns, oldest first."""
    replies: list[str]
    """(n,) the replies."""
    clusters: np.ndarray
    """(n,) str: the context id, the unit a bootstrap draws."""
    categories: np.ndarray
    """(n,) object: the context's DiaSafety category, None where it has none."""
    human_unsafe: np.ndarray
    """(n,) float: 1 unsafe, 0 safe by the human label, NaN where there is none."""
    seen: np.ndarray
    """(n,) bool: the judge learned from the reply's context (DiaSafety train, when it trained on DiaSafety)."""
    corpora: list[str]
    """The corpora of the contexts (candidates), [] for a file."""


# --- reading --------------------------------------------------------------------------------------


def read_candidates(folder: Path) -> tuple[Replies, dict]:
    """Every candidate in `<folder>/<corpus>.parquet` (each corpus that has a file) as replies; also
    {path: {sha256, rows}}. A DataError when the folder has no candidates file or no rows."""
    schema = pa.schema([CANDIDATES.field(column) for column in CANDIDATE_COLUMNS])
    paths = [folder / f"{corpus}.parquet" for corpus in CORPORA if (folder / f"{corpus}.parquet").is_file()]
    if not paths:
        raise DataError(f"{folder}: no candidates (<corpus>.parquet; run the generate or audit stage first)")
    tables = [read_table(path, schema=schema) for path in paths]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise DataError(f"{folder}: every candidates file is empty")
    inputs = {str(path): {"sha256": sha256(path), "rows": part.num_rows} for path, part in zip(paths, tables)}
    corpora = [corpus for corpus, part in zip((p.stem for p in paths), tables) if part.num_rows]
    n = table.num_rows
    replies = Replies(
        source=f"generated here ({folder})", contexts=table["context"].to_pylist(),
        replies=[reply or "" for reply in table["response"].to_pylist()],
        clusters=np.array(table["context_id"].to_pylist(), dtype=str),
        categories=np.array(table["category"].to_pylist(), dtype=object),
        human_unsafe=np.full(n, np.nan), seen=np.zeros(n, dtype=bool), corpora=corpora)
    return replies, inputs


def read_replies(path: Path, judge_corpora: list[str]) -> tuple[Replies, dict]:
    """One `audit_file` output (`replies.parquet`) as replies; `judge_corpora`: what trained the judge
    (for `seen`). A DataError for no rows, a human label outside REPLY_LABELS or several sources."""
    table = read_table(path, schema=pa.schema([AUDIT_REPLIES.field(column) for column in REPLY_COLUMNS]),
                       missing_hint="run the audit_file stage first", allow_empty=False, what="replies")
    labels = table["human_label"].to_pylist()
    unknown = sorted({label for label in labels if label is not None} - set(REPLY_LABELS))
    if unknown:
        raise DataError(f"{path}: human_label {unknown[0]!r} is not one of {', '.join(REPLY_LABELS)}")
    sources = sorted(set(table["source"].to_pylist()))
    if len(sources) != 1:
        raise DataError(f"{path}: replies from {len(sources)} sources ({', '.join(map(str, sources))}); "
                        "expected one file per audited model")
    splits = np.array(table["diasafety_split"].to_pylist(), dtype=object)
    replies = Replies(
        source=sources[0], contexts=table["context"].to_pylist(),
        replies=[reply or "" for reply in table["reply"].to_pylist()],
        clusters=np.array(table["context_id"].to_pylist(), dtype=str),
        categories=np.array(table["category"].to_pylist(), dtype=object),
        human_unsafe=np.array([np.nan if label is None else float(label == "unsafe") for label in labels]),
        seen=(splits == SEEN_SPLIT) & ("diasafety" in judge_corpora), corpora=[])
    return replies, {str(path): {"sha256": sha256(path), "rows": table.num_rows}}


# --- the worker -----------------------------------------------------------------------------------


def rate(values: np.ndarray, clusters: np.ndarray, config: EvaluateConfig) -> dict:
    """The mean of 0/1 `values` (n,) with its cluster-bootstrap interval: {value, ci, n, n_clusters}."""
    low, high = M.bootstrap_ci(values, None, config.bootstrap_samples, config.seed, CONFIDENCE, clusters=clusters)
    return {"value": round(float(values.mean()), 6), "ci": [round(low, 6), round(high, 6)], "n": len(values),
            "n_clusters": len(np.unique(clusters))}


def human_check(judge_unsafe: np.ndarray, human_unsafe: np.ndarray, clusters: np.ndarray,
                config: EvaluateConfig) -> dict:
    """The judge against the human labels on the same replies (n,): both rates, the difference judge -
    human with its paired cluster-bootstrap interval and McNemar's exact p, the share of replies where they agree, and Cohen's
    kappa (null where either side labels every reply alike)."""
    judge_values = judge_unsafe.astype(np.float64)
    low, high = M.paired_bootstrap_ci(judge_values, human_unsafe, None, config.bootstrap_samples, config.seed,
                                      CONFIDENCE, clusters=clusters)
    kappa = float(M.cohen_kappa(M.confusion_counts(judge_unsafe, human_unsafe == 1).sum(axis=0)))
    return {"human_rate": rate(human_unsafe, clusters, config), "judge_rate": rate(judge_values, clusters, config),
            "difference": {"value": round(float(judge_values.mean() - human_unsafe.mean()), 6),
                           "ci": [round(low, 6), round(high, 6)],
                           "p_value": round(M.mcnemar_exact(int((judge_unsafe & (human_unsafe == 0)).sum()),
                                                            int((~judge_unsafe & (human_unsafe == 1)).sum())), 6),
                           "n": len(judge_values), "n_clusters": len(np.unique(clusters))},
            "agreement": rate((judge_values == human_unsafe).astype(np.float64), clusters, config),
            "kappa": None if np.isnan(kappa) else round(kappa, 6) + 0.0}


def audit_model(replies: Replies, judge_unsafe: np.ndarray, config: EvaluateConfig) -> dict:
    """One model's row of the audit table (see the module docstring); `judge_unsafe` (n,) bool."""
    clusters, categories = replies.clusters, replies.categories
    entry = {"source": replies.source, "corpora": replies.corpora, "replies": len(replies.replies),
             "contexts": len(np.unique(clusters)), "empty_replies": sum(not reply.strip() for reply in replies.replies),
             "seen_by_judge": int(replies.seen.sum()),
             "unsafe_rate": rate(judge_unsafe.astype(np.float64), clusters, config), "categories": {}, "human": None}
    for category in DIASAFETY_CATEGORIES:
        members = categories == category
        if members.any():
            entry["categories"][category] = rate(judge_unsafe[members].astype(np.float64), clusters[members], config)
    labelled = ~np.isnan(replies.human_unsafe)
    if labelled.any():
        entry["human"] = {"replies": int(labelled.sum()),
                          **human_check(judge_unsafe[labelled], replies.human_unsafe[labelled], clusters[labelled],
                                        config)}
    return entry


def ordering(models: dict[str, dict]) -> dict:
    """Does the judge order the human-labelled models as humans do? `metrics.order_agreement` of their
    judge rates against their human rates (on the labelled replies), and the sentence the report prints."""
    names = [name for name, entry in models.items() if entry["human"]]
    human = [models[name]["human"]["human_rate"]["value"] for name in names]
    judged = [models[name]["human"]["judge_rate"]["value"] for name in names]
    result = {"models": names, **M.order_agreement(human, judged)}
    if len(names) < 2:
        result["sentence"] = (f"Only {len(names)} audited model has human labels, so there is no order to check."
                              if names else "No audited model has human labels, so there is no order to check.")
        return result
    ranked = sorted(zip(human, names))
    by_humans = ranked[0][1] + "".join(f" {'=' if value == before else '<'} {name}"
                                       for (before, _), (value, name) in zip(ranked, ranked[1:]))
    if not result["ordered"]:
        verdict = "humans rate every one of them equally unsafe, so there is no order to check"
    elif result["concordant"] == result["ordered"]:
        verdict = "the judge orders them as humans do"
    elif result["discordant"] == result["ordered"]:
        verdict = "the judge orders them the opposite way to humans"
    else:
        verdict = "the judge orders some pairs as humans do and some not"
    tau = result["kendall_tau_b"]
    result["sentence"] = (f"Over the {len(names)} human-labelled models (by the human unsafe rate: {by_humans}), "
                          f"{verdict}: {result['concordant']} of the {result['ordered']} pairs humans order agree, "
                          f"{result['discordant']} disagree, {result['estimate_ties']} the judge ties"
                          + (f"; Kendall's τ_b = {tau:.2f}." if tau is not None else "."))
    return result


def compute(config: EvaluateConfig, audited: dict[str, Replies], judge: ReplyJudge) -> dict:
    """The audit table of every model in `audited` (name -> its replies), in order: per model the
    judge's verdicts (`audit_model`), then the ordering check (`ordering`)."""
    from tqdm import tqdm

    models = {}
    for name, replies in tqdm(audited.items(), desc="audit_report: judge", unit="model"):
        _, unsafe = judge_replies(judge, replies.replies, replies.contexts, config.judge_threshold, name)
        models[name] = audit_model(replies, unsafe, config)
    return {"order": list(models), "models": models, "ordering": ordering(models),
            "categories": list(DIASAFETY_CATEGORIES), "judge_threshold": config.judge_threshold,
            "bootstrap": {"samples": config.bootstrap_samples, "seed": config.seed, "confidence": CONFIDENCE,
                          "clusters": "context_id (every reply to one context)"}}


def flat_metrics(results: dict) -> dict[str, float]:
    """metrics.json: `<model>/unsafe_rate`, and `<model>/human_unsafe_rate`, `<model>/judge_minus_human`
    for models with human labels."""
    flat = {}
    for name in results["order"]:
        entry = results["models"][name]
        flat[f"{name}/unsafe_rate"] = entry["unsafe_rate"]["value"]
        if entry["human"]:
            flat[f"{name}/human_unsafe_rate"] = entry["human"]["human_rate"]["value"]
            flat[f"{name}/judge_minus_human"] = entry["human"]["difference"]["value"]
    return flat


# --- run ------------------------------------------------------------------------------------------


def run(config: EvaluateConfig, models: list[str], files: list[str], judge_dir: Path, candidates_dir: Path,
        audit_dir: Path, out: Path) -> dict:
    """Audit `models` (run here: `<candidates_dir>/<name>/`) and `files` (`<audit_dir>/<name>/replies.parquet`)
    with the judge in `judge_dir` (its record says what trained it: `judging.judge_provenance`), and write
    results.json, metrics.json and report.md into `out`. Returns the results."""
    from pipeline import safety_models

    started = time.perf_counter()
    ensure_writable(out / "results.json")
    judge_record = judge_provenance(judge_dir)
    judge = safety_models.load_judge(judge_dir)
    audited, inputs = {}, {}
    for name in models:
        audited[name], read = read_candidates(candidates_dir / name)
        inputs.update(read)
    for name in files:
        audited[name], read = read_replies(audit_dir / name / "replies.parquet", judge_record["corpora"])
        inputs.update(read)
    for name, replies in audited.items():
        log.info("audit_report: %s: %d replies to %d contexts from %s", name, len(replies.replies),
                 len(np.unique(replies.clusters)), replies.source)
    results = compute(config, audited, judge)
    results.update({"judge": judge_record, "inputs": inputs, "config": dataclasses.asdict(config),
                    "git_commit": git_commit(), "library_versions": library_versions()})
    significance.limit_all(results)  # no interval or test on fewer than significance.MIN_CLUSTERS contexts
    write_json(flat_metrics(results), out / "metrics.json")
    write_json(results, out / "results.json")
    report.write_audit_report(results, out / "report.md")
    for name in results["order"]:
        entry = results["models"][name]
        human = entry["human"]
        log.info("audit_report: %s unsafe rate %.3f %s%s", name, entry["unsafe_rate"]["value"],
                 entry["unsafe_rate"]["ci"],
                 f" (human {human['human_rate']['value']:.3f}, judge on the same {human['judge_rate']['value']:.3f})"
                 if human else "")
    log.info("audit_report: %s", results["ordering"]["sentence"])
    log.info("audit_report: %d models -> %s in %.1f s", len(audited), out, time.perf_counter() - started)
    return results
