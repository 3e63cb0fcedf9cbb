"""sweep: how the method's effect on the pretrained model grows with its settings, as DVC experiments of
stage 1 alone (`params.real.yaml`), and the table docs/experiments.md quotes.

Each run is one DVC experiment named `<prefix>-<variant>`, with the preset's values, the sweep's centre
(`CENTER`) and the variant's changes (`VARIANTS`, one setting at a time around the centre: the number of training groups, epochs, LoRA rank
against full fine-tuning, the loss weight, tau and the margin; `ce` is cross-entropy alone) and the
targets `score@base` and `score@stage1`: DVC runs only what those need (the data, the base model, stage-1
mining and training, scoring), and `score@base`'s result comes from the run cache after the first run.

    python -m pipeline experiment sweep --preset params.real.yaml --out reports/sweep

writes `<out>/logs/` (DVC's output with elapsed times), `<out>/results.json` (per run: its changes, each
stage's wall time, the stage-1 model's likelihood AUC per corpus with its 95% interval and paired against
`ce` and against the untuned base on the same replies, its reference perplexity per word, its
validation ranking accuracy; the base model's figures once) and `<out>/results.md`, rendered from it.
`python -m pipeline experiment sweep-report --out reports/sweep` writes the two files alone.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, PipelineError
from pipeline.experiment import (
    dvc, experiments, get_dotted, prepare_environment, queue_and_run, read_logs, with_changes,
)
from pipeline.report import MISSING

log = logging.getLogger(__name__)

# score@base is run once, by the first run that needs it: a stage whose outputs are not cached
# (`cache: false`) is not restored from DVC's run cache, so every run would score the base model again.
TARGETS = ("score@stage1",)
FIRST_TARGETS = ("score@base", "score@stage1")
BASELINE = "ce"
# The sweep's centre, on top of the preset: stage 1 on all four adversarial corpora (the sample's
# ProsocialDialog and MIC beside DiaSafety and ToxiChat), 100 train groups per capped corpus, as the sweep
# was first run (params.real.yaml has since moved to the real corpora alone, 300 groups each: groups_real).
CENTER: dict[str, Any] = {
    "mine.stage1_corpora": ["prosocial_dialog", "mic", "diasafety", "toxichat"],
    "mine.stage1_max_groups": {"train": 100, "validation": 25, "test": 100},
    "mine.stage2_max_groups": {"train": 50, "validation": 10, "test": 25},
}
# What each run changes on top of the centre (dotted params.yaml keys): one setting at a time.
VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"train.contrastive_weight": 0.0},
    "method": {},
    # stage 1 on the real adversarial corpora alone, 300 train groups each: params.real.yaml's choice
    "groups_real": {"mine.stage1_corpora": ["diasafety", "toxichat"], "mine.stage1_max_groups.train": 300},
    "epochs_2": {"train_stage1.epochs": 2},
    "full": {"train.lora.enabled": False, "train_stage1.learning_rate": 0.0001},
    "weight_2": {"train.contrastive_weight": 2.0},
    "tau_low": {"train.tau": 0.1},
    "margin_0": {"train.margin": 0.0},
}
SCORES = "reports/scores/{model}/eval_scores.json"
REPLIES = "reports/scores/{model}/likelihood.parquet"
TRAIN_METRICS = "reports/train/stage1/metrics.json"
CORPORA = ("diasafety", "toxichat")


def run_name(prefix: str, variant: str) -> str:
    return f"{prefix}-{variant}"


def run_params(preset: dict, variant: str, mirror: str) -> dict:
    """The params.yaml of one run: the preset, the centre, the variant's changes, `corpora.mirror` made
    absolute."""
    return with_changes(with_changes(preset, CENTER), {**VARIANTS[variant], "corpora.mirror": mirror})


# --- reading a run's files from its experiment commit ----------------------------------------------


def git_bytes(rev: str, path: str) -> bytes | None:
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)
    return shown.stdout if shown.returncode == 0 else None


def git_json(rev: str, path: str) -> dict | None:
    data = git_bytes(rev, path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise DataError(f"experiment {rev[:7]}: {path} is not valid JSON ({error})") from None


def git_replies(rev: str, path: str):
    import pyarrow.parquet as pq

    data = git_bytes(rev, path)
    return None if data is None else pq.read_table(io.BytesIO(data))


# --- the table --------------------------------------------------------------------------------------


def model_figures(scores: dict | None) -> dict:
    """The figures of one model's eval_scores.json the table shows."""
    if scores is None:
        return {}
    auc = scores.get("likelihood_auc") or {}
    per_word = scores.get("reference_ppl_per_word") or {}
    return {"likelihood_auc": {scope: auc.get(scope) for scope in (*CORPORA, "overall") if scope in auc},
            "ppl_per_word": {scope: per_word.get(scope) for scope in ("casual", "adversarial") if scope in per_word},
            "group_ranking_accuracy": scores.get("group_ranking_accuracy")}


def paired(replies, baseline_replies, n_samples: int, seed: int) -> dict | None:
    """The likelihood AUC of `replies` against `baseline_replies` on the same replies, per corpus."""
    from pipeline.likelihood import compare

    if replies is None or baseline_replies is None:
        return None
    compared, _ = compare(replies, baseline_replies, n_samples, seed)
    out = {}
    for scope in CORPORA:
        entry = compared["likelihood_auc"].get(scope)
        if entry and entry["value"] is not None:
            out[scope] = {**entry, "difference": entry["value"] - entry["baseline"]}
    return out


def collect(shown: list[dict], prefix: str, times: dict[str, dict], read=(git_json, git_replies),
            n_samples: int = 1000, seed: int = 0) -> dict:
    """results.json of the sweep from `dvc exp show --json` output: the runs named `<prefix>-<variant>`."""
    read_json, read_replies = read
    found = {name[len(prefix) + 1:]: exp for name, exp in experiments(shown).items()
             if name.startswith(f"{prefix}-") and name[len(prefix) + 1:] in VARIANTS}
    if not found:
        raise DataError(f"dvc exp show: no experiment named {prefix}-<variant> (variants: {', '.join(VARIANTS)}); "
                        "run `python -m pipeline experiment sweep` first")
    replies = {variant: read_replies(exp["rev"], REPLIES.format(model="stage1")) for variant, exp in found.items()}
    base_replies, base = None, None
    runs = {}
    for variant in (v for v in VARIANTS if v in found):
        exp = found[variant]
        wrong = {key: get_dotted(exp["params"], key) for key, value in VARIANTS[variant].items()
                 if get_dotted(exp["params"], key) != value}
        if wrong:
            raise DataError(f"experiment {run_name(prefix, variant)}: params {wrong} do not match its variant")
        if base_replies is None:  # the base model's scores, from the first run that has them
            base = model_figures(read_json(exp["rev"], SCORES.format(model="base")))
            base_replies = read_replies(exp["rev"], REPLIES.format(model="base"))
        stages = times.get(run_name(prefix, variant))
        train = read_json(exp["rev"], TRAIN_METRICS) or {}
        runs[variant] = {
            "rev": exp["rev"], "baseline_commit": exp["baseline"], "changes": VARIANTS[variant],
            "groups": get_dotted(exp["params"], "mine.stage1_max_groups"),
            "stage_seconds": {s: e["seconds"] for s, e in (stages or {}).items() if e["status"] == "ran"},
            "stage1": model_figures(read_json(exp["rev"], SCORES.format(model="stage1"))),
            "validation_ranking_accuracy": (train.get("val") or {}).get("ranking_accuracy"),
            "against_ce": paired(replies[variant], replies.get(BASELINE), n_samples, seed) if variant != BASELINE else None,
            "against_base": paired(replies[variant], base_replies, n_samples, seed),
        }
    return {"prefix": prefix, "targets": list(FIRST_TARGETS), "baseline": BASELINE, "base": base, "runs": runs}


def _value(record: dict | None, digits: int = 3) -> str:
    if not record or record.get("value") is None:
        return MISSING
    ci = record.get("ci")
    return f"{record['value']:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _difference(record: dict | None) -> str:
    if not record or record.get("difference") is None:
        return MISSING
    low, high = record["ci"] if record.get("ci") else (None, None)
    text = f"{record['difference']:+.3f}" + (f" [{low:+.3f}, {high:+.3f}]" if low is not None else "")
    return f"**{text}**" if low is not None and (low > 0 or high < 0) else text


def _changes(changes: dict) -> str:
    return ", ".join(f"`{key}` {value}" for key, value in changes.items()) or "the preset"


def render(results: dict) -> str:
    """results.md: one row per run, and the untuned base model's row first."""
    header = ["run", "changes", "stage-1 min", "AUC DiaSafety", "AUC ToxiChat", "− ce, DiaSafety", "− ce, ToxiChat",
              "− base, DiaSafety", "ppl/word casual", "ppl/word adversarial"]
    lines = [f"# The stage-1 sweep: `{results['prefix']}-<variant>`", "",
             "Likelihood AUC of humans' safe over unsafe test replies (95% interval over dialogues); differences "
             "are paired on the same replies (bold: the interval excludes 0); perplexity per word of the test "
             "groups' reference replies. Rendered from results.json by `python -m pipeline experiment sweep-report`.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results.get("base") or {}
    auc = base.get("likelihood_auc") or {}
    ppl = base.get("ppl_per_word") or {}
    lines.append("| base (untuned) | | | " + " | ".join([_value(auc.get("diasafety")), _value(auc.get("toxichat")), "", "",
                                                      "", _value(ppl.get("casual"), 1),
                                                      _value(ppl.get("adversarial"), 1)]) + " |")
    for variant, run in results["runs"].items():
        figures = run["stage1"]
        auc, ppl = figures.get("likelihood_auc") or {}, figures.get("ppl_per_word") or {}
        ce, against_base = run.get("against_ce") or {}, run.get("against_base") or {}
        minutes = run["stage_seconds"].get("train_stage1")
        cells = [variant, _changes(run["changes"]), f"{minutes / 60:.1f}" if minutes else MISSING,
                 _value(auc.get("diasafety")), _value(auc.get("toxichat")), _difference(ce.get("diasafety")),
                 _difference(ce.get("toxichat")), _difference(against_base.get("diasafety")),
                 _value(ppl.get("casual"), 1), _value(ppl.get("adversarial"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    from pipeline.artifacts import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    with atomic_path(out / "results.md") as path:
        path.write_text(render(results), encoding="utf-8")


def report(out: Path, prefix: str, shown: list[dict] | None = None) -> dict:
    if shown is None:
        shown = json.loads(dvc("exp", "show", "--json", "--no-fetch") or "[]")
    results = collect(shown, prefix, read_logs(out / "logs"))
    write(results, out)
    return results


# --- run ---------------------------------------------------------------------------------------------


def run(preset: Path, out: Path, params: Path, prefix: str, variants: list[str] | None = None) -> dict:
    """Queue the sweep's runs this commit lacks (all of `VARIANTS`, or `variants`), run the queue in the
    foreground, write the table; returns the results."""
    from pipeline.errors import ConfigError

    chosen = variants or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variant = {unknown[0]!r} is not allowed: one of {', '.join(VARIANTS)}")
    wanted, base, mirror = prepare_environment(preset, params, prefix)
    # The baseline run also scores the base model (once: see FIRST_TARGETS); the others stage 1 only.
    runs = {run_name(prefix, variant): (run_params(wanted, variant, mirror),
                                        FIRST_TARGETS if variant == BASELINE else TARGETS) for variant in chosen}
    status = queue_and_run(runs, base, out / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-sweep.log")
    results = report(out, prefix)
    missing = [run_name(prefix, v) for v in chosen if v not in results["runs"]]
    if missing:
        raise PipelineError(f"runs {', '.join(missing)} did not finish; see {out / 'logs'} and `dvc queue logs <name>`")
    if status != 0:
        raise PipelineError(f"dvc exp run --run-all exited with {status}; see {out / 'logs'}")
    return results
