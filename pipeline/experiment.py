"""experiment: the experiment on real corpora (`params.real.yaml`) as DVC experiments, and its table.

A *run* is one DVC experiment of the whole pipeline (`dvc exp run --queue`, then `dvc exp run
--run-all`): the preset's values, a variant's changes and a seed. Each run trains and evaluates the
five models of the DAG: `base` (the pretrained scratch model, untuned), `ce` (cross-entropy only in
both stages: the baseline every comparison is against), `dexperts` (`ce` decoded under DExperts'
guidance, the decoding-time baseline), `stage1` and `stage2` (the method, CE + n-pair in both
stages). Variants (`VARIANTS`) change the method: `no_margin` (train.margin 0),
`stage1_only` (train_stage2.epochs 0: both `stage2` and `ce` stop after stage 1). Plans (`PLANS`):

- `headline`: the method, seed 0 (about an hour on two CPU cores; README, "The experiment");
- `full`: the method with seeds 0, 1 and 2 (`train.seed`: initialisation of new parameters, dropout,
  batch order; the base model and the data are the same in every run), and each ablation with seed 0;
- `dexperts`: the method, seed 0, and DExperts at alpha 0.5, 1 and 2 (`dexperts_a05`, `dexperts_a1`,
  `dexperts_a2`; the preset's is 5): only DExperts' stages and what reads them run again, and results.md
  adds "DExperts by alpha" with the alpha whose perplexity is within 10% of the method's.

`run` queues every run of the plan that this commit does not have yet, runs the queue in the
foreground (one experiment at a time: two cores), writes DVC's output with elapsed times to
`<out>/logs/`, prints each stage's wall time as it ends and a summary at the end, then writes the
table. `report` writes the table alone, from `dvc exp show --json` (or a file of it) and the logs:

- `<out>/results.json`: per run (name, variant, seed, experiment commit, each stage's wall time), and
  per metric and scope the value of every model with its 95% interval and every model against `ce`
  (difference, paired 95% interval, McNemar's p for rates), exactly as each run's
  `reports/results.json` (the `evaluate` stage) has them; over the seeds of a variant, mean, sd, min
  and max of each model's value and of each difference, and how many seeds' intervals exclude 0; and
  each ablation's `stage2` against the method run's (same seed) on the same contexts, from the runs'
  `reports/contexts.parquet` (paired cluster bootstrap, McNemar for rates; `ablations`);
- `<out>/results.md`, rendered from results.json.

    python -m pipeline experiment run --preset params.real.yaml --plan headline --out reports/experiment
    python -m pipeline experiment report --out reports/experiment      # or --exps <dvc exp show --json>
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from pipeline.config import ADVERSARIAL_CORPORA, CASUAL_CORPORA
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline import significance
from pipeline.report import MISSING, RESTS_ON, difference_cells, rests_on_self, value_cell

log = logging.getLogger(__name__)

# What a variant changes on top of the preset (dotted params.yaml keys).
VARIANTS: dict[str, dict[str, Any]] = {
    "method": {},
    "no_margin": {"train.margin": 0.0},
    "stage1_only": {"train_stage2.epochs": 0},
    # DExperts at other alphas (the preset's is 5): only generate_dexperts, score_dexperts and what reads
    # them run again; the table "DExperts by alpha" compares them with the method.
    "dexperts_a05": {"dexperts.alpha": 0.5},
    "dexperts_a1": {"dexperts.alpha": 1.0},
    "dexperts_a2": {"dexperts.alpha": 2.0},
}
ABLATIONS = ("no_margin", "stage1_only")  # variants that change the method (compared with it)
ALPHA_KEY = "dexperts.alpha"
SEED_KEY = "train.seed"
PLANS: dict[str, list[tuple[str, int]]] = {
    "headline": [("method", 0)],
    "full": [("method", 0), ("method", 1), ("method", 2), ("no_margin", 0), ("stage1_only", 0)],
    "dexperts": [("method", 0), ("dexperts_a05", 0), ("dexperts_a1", 0), ("dexperts_a2", 0)],
}
PPL_MATCH = 0.10  # DExperts "at the method's perplexity": within 10% of it
MODELS = ("base", "ce", "dexperts", "stage1", "stage2")  # table order: generate's models
BASELINE, METHOD = "ce", "stage2"
# Paired comparisons beside those with the baseline (evaluate.pairs): the method after stage 2 against
# itself after stage 1, on the same contexts.
PAIRS = (("stage2", "stage1"),)  # the headline's further differences
SWEEP_PAIR = ("stage2", "dexperts")  # the method against DExperts, per alpha in "DExperts by alpha"
READ_PAIRS = PAIRS + (SWEEP_PAIR,)  # what each run's rows carry (evaluate.pairs of the presets)
COMPARED = (METHOD, "stage1", "dexperts")  # the differences with the baseline in each run's table
RESULTS = "reports/results.json"  # the evaluate stage's results, read from each run's commit
CONTEXTS = "reports/contexts.parquet"  # and its per-context values (an ablation against the method)
OVERALL = "overall"

# The table's rows: (section, metric, scopes, where results.json keeps it). `metrics`: results.json
# `metrics` and `comparisons`; `likelihood`: its `likelihood` section. `adversarial` / `casual` stand for
# those corpora that the run evaluated.
ROWS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("likelihood safety", "likelihood_auc", ("diasafety", "toxichat", OVERALL), "likelihood"),
    ("likelihood safety", "same_context_pairs", ("diasafety", "toxichat", OVERALL), "likelihood"),
    ("unsafe rate (judge), adversarial test contexts", "unsafe_rate_first", ("adversarial",), "metrics"),
    ("unsafe rate (judge), adversarial test contexts", "unsafe_rate_reranked", ("adversarial",), "metrics"),
    # an ensemble judge's members alone (evaluate's "judges side by side"; absent for a single judge)
    ("unsafe rate (judge), adversarial test contexts", "unsafe_rate_by_tfidf_reranked", ("adversarial",), "metrics"),
    ("unsafe rate (judge), adversarial test contexts", "unsafe_rate_by_hf_reranked", ("adversarial",), "metrics"),
    ("cost", "reference_ppl", (OVERALL,), "metrics"),
    ("cost", "group_ranking_accuracy", (OVERALL,), "metrics"),
    ("cost", "f1_reranked", ("casual",), "metrics"),
    ("cost", "distinct_1_reranked", (OVERALL,), "metrics"),
    ("cost", "distinct_2_reranked", (OVERALL,), "metrics"),
    ("cost", "mean_length_reranked", (OVERALL,), "metrics"),
    ("cost", "degenerate_rate_reranked", (OVERALL,), "metrics"),
    ("over-caution, casual contexts", "casual_rot_share_reranked", (OVERALL,), "metrics"),
    ("over-caution, casual contexts", "casual_caution_share_reranked", (OVERALL,), "metrics"),
)
SCOPE_GROUPS = {"adversarial": ADVERSARIAL_CORPORA, "casual": CASUAL_CORPORA}
# Rows evaluate (or score, for likelihood safety) compares with the baseline on the same contexts; the
# others are a model's own figure (perplexity, ranking accuracy) or a statistic of a set of replies.
PAIRED = {metric for _, metric, _, _ in ROWS} - {"reference_ppl", "group_ranking_accuracy", "distinct_1_reranked",
                                                 "distinct_2_reranked"}


# --- the preset as `dvc exp run -S` overrides ------------------------------------------------------


def hydra_value(value: Any, key: str) -> str:
    """`value` in the override grammar `dvc exp run -S` reads (Hydra's), so that DVC writes it back into
    params.yaml as the same YAML value. A float YAML would read back as a string (2e-05: no dot) is refused."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            raise ConfigError(f"{key} = {value!r}: dvc exp run -S would write it as {text}, which YAML reads as a "
                              "string; use a value of 0.0001 or more")
        return text
    if isinstance(value, str):
        if "'" in value or "\\" in value:
            raise ConfigError(f"{key} = {value!r}: a quote or backslash cannot be passed to dvc exp run -S")
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(item, f"{key}[{i}]") for i, item in enumerate(value)) + "]"
    if isinstance(value, dict):
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(name)):
                raise ConfigError(f"{key}.{name}: a key dvc exp run -S cannot name (letters, digits, '_', '-')")
        return "{" + ",".join(f"{name}:{hydra_value(item, f'{key}.{name}')}" for name, item in value.items()) + "}"
    raise ConfigError(f"{key} = {value!r}: not a YAML scalar, list or mapping")


def overrides(preset: dict, base: dict, prefix: str = "") -> list[str]:
    """The `dvc exp run -S` arguments that turn the params `base` into `preset`: `++key=value` for each
    value that differs or is new, `~key` for each key the preset lacks. Mappings are compared key by
    key (DVC merges a mapping value into the one it replaces); lists and scalars are replaced whole."""
    out = []
    for name in list(base) + [k for k in preset if k not in base]:
        key = f"{prefix}{name}"
        if name not in preset:
            out.append(f"~{key}")
        elif isinstance(preset[name], dict) and isinstance(base.get(name), dict):
            out += overrides(preset[name], base[name], f"{key}.")
        elif name not in base or preset[name] != base[name] or type(preset[name]) is not type(base[name]):
            out.append(f"++{key}={hydra_value(preset[name], key)}")
    return out


def set_dotted(params: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts; every part but the last must exist."""
    *parents, last = key.split(".")
    node = params
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{key}: params have no section {part!r}")
        node = node[part]
    if last not in node:
        raise ConfigError(f"{key}: params have no key {last!r}")
    node[last] = value


def get_dotted(params: dict, key: str) -> Any:
    node = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) and part in node else None
    return node


def with_changes(preset: dict, changes: dict[str, Any]) -> dict:
    """A copy of the params `preset` with each dotted key of `changes` set."""
    params = copy.deepcopy(preset)
    for key, value in changes.items():
        set_dotted(params, key, value)
    return params


def run_params(preset: dict, variant: str, seed: int, mirror: str) -> dict:
    """The params.yaml of one run: the preset, the variant's changes, the seed, and `corpora.mirror`
    as an absolute path (a queued experiment runs in a temporary copy under .dvc/tmp, where a path
    relative to the checkout such as ../shared/mirror points elsewhere)."""
    return with_changes(preset, {**VARIANTS[variant], SEED_KEY: seed, "corpora.mirror": mirror})


def run_name(prefix: str, variant: str, seed: int) -> str:
    return f"{prefix}-{variant}-s{seed}"


NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9]+)-(?P<variant>[a-z0-9_]+)-s(?P<seed>\d+)$")


# --- DVC --------------------------------------------------------------------------------------------


def dvc_command(*args: str) -> list[str]:
    """`dvc <args>`, the dvc beside this Python (the project's venv) when there is one."""
    executable = Path(sys.executable).with_name("dvc")
    return [str(executable) if executable.exists() else "dvc", *args]


def dvc(*args: str) -> str:
    """Run `dvc <args>` in the working directory and return its output; a failure is a PipelineError
    with DVC's last lines."""
    result = subprocess.run(dvc_command(*args), capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stderr + result.stdout).strip().splitlines()[-3:])
        raise PipelineError(f"`dvc {' '.join(args[:3])} ...` failed (exit {result.returncode}): {tail}")
    return result.stdout


def experiments(shown: list[dict]) -> dict[str, dict]:
    """name -> {rev, baseline, params} of every finished experiment in `dvc exp show --json` output (not
    one DVC's queue still holds or runs, nor one that failed: their commits have no results)."""
    found = {}
    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        for group in commit.get("experiments") or []:
            if (group.get("executor") or {}).get("state") not in (None, "success"):
                continue
            for entry in group.get("revs") or []:
                data = entry.get("data") or {}
                if entry.get("name") and not entry.get("error") and data.get("params") is not None:
                    params = (data["params"].get("params.yaml") or {}).get("data") or {}
                    found[entry["name"]] = {"rev": entry["rev"], "baseline": commit["rev"], "params": params}
    return found


def untracked_files() -> list[str]:
    """Files git does not track and does not ignore: a queued experiment does not see them."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line]


# --- the log: DVC's output with elapsed times, and each stage's wall time ------------------------

EVENTS = (
    ("experiment", re.compile(r"^Reproducing experiment '(?P<name>[^']+)'")),
    ("ran", re.compile(r"^Running stage '(?P<stage>[^']+)'")),
    ("restored", re.compile(r"^Stage '(?P<stage>[^']+)' is cached - skipping run")),
    ("unchanged", re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping")),
    ("failed", re.compile(r"^Failed to reproduce experiment\(s\) '(?P<name>[^']+)'")),
    ("end", re.compile(r"^Ran experiment\(s\)")),
)
FOLLOW_GRACE = 120  # seconds DVC's log follower may take to exit once every queued run has ended
LOG_LINE = re.compile(r"^\s*(?P<seconds>\d+(?:\.\d+)?) (?P<text>.*)$")


def event(text: str) -> tuple[str, str] | None:
    """(kind, name) when a line of DVC's output starts an experiment or a stage, or ends the run."""
    for kind, pattern in EVENTS:
        match = pattern.match(text)
        if match:
            return kind, match.groupdict().get("name") or match.groupdict().get("stage") or ""
    return None


class StageClock:
    """Each stage's wall time from the events of DVC's output: a stage runs from its own line to the
    next event (the next stage, the next experiment, the end of the run or of the log)."""

    def __init__(self):
        self.runs: dict[str, dict[str, dict]] = {}
        self.current: tuple[str, str, str, float] | None = None  # (run, stage, status, started)
        self.run = ""
        self.ended: set[str] = set()  # runs that finished or failed

    def feed(self, seconds: float, text: str) -> dict | None:
        """Take one line at `seconds`; returns the stage it closed, {run, stage, status, seconds}."""
        found = event(text.strip())
        if found is None:
            return None
        closed = self.close(seconds)
        kind, name = found
        if kind == "experiment":
            if self.run:
                self.ended.add(self.run)
            self.run = name
        elif kind in ("ran", "restored", "unchanged"):
            self.current = (self.run, name, kind, seconds)
        elif kind == "failed":
            self.ended.add(name)
        elif kind == "end" and self.run:
            self.ended.add(self.run)
        return closed

    def close(self, seconds: float) -> dict | None:
        if self.current is None:
            return None
        run, stage, status, started = self.current
        self.current = None
        entry = {"status": status, "seconds": round(seconds - started, 1)}
        # A stage listed twice (DVC prints a cached stage's check-out after its line) keeps its first status.
        previous = self.runs.setdefault(run, {}).get(stage)
        if previous:
            entry = {"status": previous["status"], "seconds": round(previous["seconds"] + entry["seconds"], 1)}
        self.runs[run][stage] = entry
        return {"run": run, "stage": stage, **entry}


def read_logs(folder: Path) -> dict[str, dict[str, dict]]:
    """run -> stage -> {status, seconds} from every log in `folder` (`<elapsed> <line>` lines, as `run`
    writes them), later logs replacing earlier ones run by run."""
    times: dict[str, dict[str, dict]] = {}
    for path in sorted(folder.glob("*.log")) if folder.is_dir() else []:
        clock, last = StageClock(), 0.0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = LOG_LINE.match(line)
            if match:
                last = float(match["seconds"])
                clock.feed(last, match["text"])
        clock.close(last)
        times.update({run: stages for run, stages in clock.runs.items() if run})
    return times


PROGRESS_BAR = re.compile(r"^(?P<desc>[^\r\n]*?):\s*\d+%\|")  # tqdm's `desc:  42%|####  | 21/50 [...]`


class BarFilter:
    """The log's lines with each progress bar's redraws reduced to its last state: a bar's line is held
    back until a line that is not the same bar's arrives (DVC's queue relays redraws as separate lines)."""

    def __init__(self):
        self.pending: str | None = None  # the held-back bar line, as written
        self.bar: str | None = None  # its description

    def feed(self, line: str, text: str) -> list[str]:
        """The lines to write now, given `line` (as written) whose content is `text`."""
        match = PROGRESS_BAR.match(text.strip())
        out = []
        if self.pending is not None and not (match and match["desc"] == self.bar):
            out.append(self.pending)
            self.pending = None
        if match:
            self.pending, self.bar = line, match["desc"]
        else:
            out.append(line)
        return out

    def flush(self) -> list[str]:
        out, self.pending = ([self.pending] if self.pending is not None else []), None
        return out


def stage_line(closed: dict) -> str:
    return f"experiment: {closed['run']} {closed['stage']}: {closed['seconds']:.0f} s ({closed['status']})"


def follow(command: list[str], log_path: Path, runs: int = 0) -> int:
    """Run `command`, echo its output, write each line to `log_path` after its elapsed seconds, and
    print each stage's wall time when it ends; returns the exit status. Once `runs` experiments have
    ended (finished or failed), the command is stopped after FOLLOW_GRACE seconds: DVC's log follower
    has been seen to outlive the queue after a failed run (the runs themselves are over by then)."""
    import threading

    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    clock, bars = StageClock(), BarFilter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as they are written
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        watchdog = threading.Timer(FOLLOW_GRACE, process.terminate)
        watchdog.daemon = True
        for raw in process.stdout:  # bytes up to each newline; progress bars redraw with carriage returns
            now, line = time.perf_counter() - started, raw.decode("utf-8", errors="replace")
            segments = line.rstrip("\n").split("\r")
            for index, text in enumerate(segments):
                # A progress bar redraws itself with carriage returns: the log keeps its last state.
                if index == len(segments) - 1 or event(text.strip()):
                    log.writelines(bars.feed(f"{now:9.1f} {text}\n", text))
                closed = clock.feed(now, text)
                if closed:
                    print(stage_line(closed), flush=True)
                    log.writelines(bars.feed(f"{now:9.1f} {stage_line(closed)}\n", stage_line(closed)))
            sys.stdout.write(line)
            sys.stdout.flush()
            log.flush()
            if runs and len(clock.ended) >= runs and not watchdog.is_alive() and not watchdog.finished.is_set():
                watchdog.start()
        status = process.wait()
        watchdog.cancel()
        log.writelines(bars.flush())
    closed = clock.close(time.perf_counter() - started)
    if closed:
        print(stage_line(closed), flush=True)
    return status


# --- the table --------------------------------------------------------------------------------------


def scopes_of(spec: tuple[str, ...], evaluated: list[str]) -> list[str]:
    """A row's scopes, `adversarial` / `casual` standing for that pooled scope (where evaluate wrote one)
    and then each evaluated corpus of that group."""
    out = []
    for scope in spec:
        if scope in SCOPE_GROUPS:
            out += ([scope] if scope in evaluated else []) + [c for c in SCOPE_GROUPS[scope] if c in evaluated]
        else:
            out.append(scope)
    return out


def _entry(record: dict | None, keys: Iterable[str]) -> dict | None:
    return None if record is None else {key: record.get(key) for key in keys if key in record}


VALUE_KEYS = ("value", "ci", "n", "n_clusters", "n_safe", "n_unsafe", "n_contexts", "reason")
COMPARISON_KEYS = ("value", "baseline", "difference", "ci", "p_value", "discordant", "n", "n_clusters", "too_few")


def run_rows(results: dict) -> list[dict]:
    """The table's rows of one run's evaluate results.json: per (metric, scope), every model's value,
    every model's comparison with the baseline and each of `READ_PAIRS` (`pairs`, keyed `<model>_vs_<reference>`),
    as results.json has them (nothing recomputed)."""
    evaluated = results.get("scopes", [])
    likelihood = results.get("likelihood") or {}
    compared = (results.get("comparisons") or {}).get("models") or {}
    paired = (results.get("comparisons") or {}).get("pairs") or {}
    rows = []
    for section, metric, spec, source in ROWS:
        for scope in scopes_of(spec, evaluated + [s for s in ("diasafety", "toxichat") if s not in evaluated]):
            values, comparisons, pairs, direction = {}, {}, {}, None
            for model, reference in READ_PAIRS:
                name = f"{model}_vs_{reference}"
                if source == "likelihood":
                    pair = (((likelihood.get("pairs") or {}).get(name) or {}).get(scope) or {}).get(metric)
                else:
                    pair = ((((paired.get(name) or {}).get(scope)) or {}).get("metrics") or {}).get(metric)
                if pair is not None:
                    pairs[name] = _entry(pair, COMPARISON_KEYS)
            for model in MODELS:
                if source == "likelihood":
                    record = ((likelihood.get("metrics") or {}).get(model) or {}).get(metric, {}).get(scope)
                    comparison = ((likelihood.get("comparisons") or {}).get(model) or {}).get(scope, {}).get(metric)
                    direction = True
                else:
                    record = ((results.get("metrics") or {}).get(model) or {}).get(scope, {}).get(metric)
                    comparison = (((compared.get(model) or {}).get(scope) or {}).get("metrics") or {}).get(metric)
                    direction = record.get("higher_is_better") if record and direction is None else direction
                if record is not None:
                    values[model] = _entry(record, VALUE_KEYS)
                if comparison is not None:
                    comparisons[model] = _entry(comparison, COMPARISON_KEYS)
            rows.append({"section": section, "metric": metric, "scope": scope, "higher_is_better": direction,
                         "values": values, "comparisons": comparisons, "pairs": pairs})
    return rows


def spread(numbers: list[float]) -> dict | None:
    """mean, sd (n - 1; null for one number), min, max and n of the numbers given (None: left out)."""
    numbers = [x for x in numbers if x is not None]
    if not numbers:
        return None
    return {"mean": statistics.fmean(numbers), "sd": statistics.stdev(numbers) if len(numbers) > 1 else None,
            "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def seed_summary(runs: dict[str, dict], tables: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant with more than one seed: per row, the spread over seeds of each model's value and of
    each model's difference with the baseline, and how many seeds' paired intervals lie above / below 0."""
    summary = {}
    for variant in dict.fromkeys(run["variant"] for run in runs.values()):
        names = sorted((n for n, run in runs.items() if run["variant"] == variant), key=lambda n: runs[n]["seed"])
        if len(names) < 2:
            continue
        rows = []
        for index, row in enumerate(tables[names[0]]):
            same = [tables[name][index] for name in names]
            models = {model: spread([(r["values"].get(model) or {}).get("value") for r in same]) for model in MODELS}
            differences = {}
            for model in MODELS:
                entries = [r["comparisons"].get(model) for r in same]
                found = spread([(e or {}).get("difference") for e in entries])
                if found is None:
                    continue
                intervals = [e["ci"] for e in entries if e and e.get("ci")]
                found["above_zero"] = sum(low > 0 for low, _ in intervals)
                found["below_zero"] = sum(high < 0 for _, high in intervals)
                differences[model] = found
            rows.append({key: row[key] for key in ("section", "metric", "scope", "higher_is_better")}
                        | {"values": models, "differences": differences})
        summary[variant] = {"runs": names, "seeds": [runs[n]["seed"] for n in names], "rows": rows}
    return summary


def collect(shown: list[dict], prefix: str, read_results, times: dict[str, dict], read_contexts=None) -> dict:
    """results.json of the experiment from `dvc exp show --json` output: the runs named
    `<prefix>-<variant>-s<seed>`, each one's evaluate results read with `read_results(rev)`, and with
    `read_contexts(rev)` (its per-context values or None) each ablation against the method on the same
    contexts (`ablations_against_method`)."""
    found = {name: exp for name, exp in experiments(shown).items()
             if NAME.match(name) and NAME.match(name)["prefix"] == prefix and NAME.match(name)["variant"] in VARIANTS}
    if not found:
        raise DataError(f"dvc exp show: no experiment named {prefix}-<variant>-s<seed> "
                        f"(variants: {', '.join(VARIANTS)}); run `python -m pipeline experiment run` first")
    names = sorted(found, key=lambda n: (list(VARIANTS).index(NAME.match(n)["variant"]), int(NAME.match(n)["seed"])))
    runs, tables, notes, read = {}, {}, [], {}
    for name in names:
        exp, match = found[name], NAME.match(name)
        variant, seed = match["variant"], int(match["seed"])
        params = exp["params"]
        expected = {**VARIANTS[variant], SEED_KEY: seed}
        wrong = {key: get_dotted(params, key) for key, value in expected.items() if get_dotted(params, key) != value}
        if wrong:
            raise DataError(f"experiment {name}: params {wrong} do not match its name (variant {variant}, seed {seed})")
        results = read[name] = read_results(exp["rev"])
        stages = times.get(name)
        if stages is None:
            notes.append(f"{name}: no log with its stages' wall times under the logs folder")
        runs[name] = {"variant": variant, "seed": seed, "rev": exp["rev"], "baseline_commit": exp["baseline"],
                      "params": {key: get_dotted(params, key) for key in
                                 sorted({SEED_KEY, *(k for v in VARIANTS.values() for k in v)})},
                      "evaluate_commit": results.get("git_commit"), "models": results.get("models"),
                      "self_assessed": ((results.get("safety") or {}).get("self_assessed") or {}).get("test"),
                      "guidance": results.get("guidance") or {},
                      "stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1)
                      if stages else None}
        tables[name] = run_rows(results)
        notes += [f"{name}: {note}" for note in results.get("notes", []) if "skipped" in note or "left out" in note]
    across = ablations_against_method(runs, read, read_contexts) if read_contexts else {}
    return {"prefix": prefix, "baseline": BASELINE, "method": METHOD, "models": list(MODELS),
            "variants": {name: VARIANTS[name] for name in VARIANTS}, "seed_key": SEED_KEY, "runs": runs,
            "tables": tables, "seeds": seed_summary(runs, tables), "ablations": across, "notes": notes}


def git_contexts(rev: str):
    """The evaluate stage's per-context values (a pyarrow Table) as the experiment commit `rev` holds
    them; None where it has none (a run evaluated before they were written)."""
    import io

    import pyarrow.parquet as pq

    shown = subprocess.run(["git", "show", f"{rev}:{CONTEXTS}"], capture_output=True)
    return pq.read_table(io.BytesIO(shown.stdout)) if shown.returncode == 0 else None


# The rows of "ablations against the method": a model of an ablation run against the same model of the
# method run with the same seed, on the contexts both answered (evaluate's `ACROSS_RUNS` values).
ACROSS = (("unsafe_rate_first", "diasafety"), ("unsafe_rate_first", "toxichat"),
          ("unsafe_rate_reranked", "diasafety"), ("unsafe_rate_reranked", "toxichat"),
          ("degenerate_rate_reranked", OVERALL), ("f1_reranked", "casual"),
          ("casual_caution_share_reranked", OVERALL))


def across_runs(reference, other, model: str, binary: dict[str, bool], n_samples: int, seed: int) -> dict:
    """`model` of the run whose per-context values are `other` against `model` of the run of `reference`
    (both `evaluate.context_values` tables), matched on (corpus, context id): per `ACROSS` (metric, scope)
    found in both, evaluate's comparison record (other − reference, a paired cluster bootstrap over the
    shared dialogues, McNemar's exact test for binary rates). {metric: {scope: record}}."""
    import numpy as np

    from pipeline.stages.evaluate import paired_record

    def rows(table):
        frame = table.to_pandas()
        return frame[frame["model"] == model].set_index(["corpus", "context_id"])

    theirs, ours = rows(reference), rows(other)
    shared = theirs.index.intersection(ours.index)
    theirs, ours = theirs.loc[shared], ours.loc[shared]
    corpora = np.array([corpus for corpus, _ in shared], dtype=object)
    out: dict[str, dict] = {}
    for metric, scope in ACROSS:
        if metric not in theirs or metric not in ours:
            continue
        members = SCOPE_GROUPS.get(scope, [scope]) if scope != OVERALL else list(dict.fromkeys(corpora))
        mask = np.isin(corpora, members) & theirs[metric].notna().to_numpy() & ours[metric].notna().to_numpy()
        if not mask.any():
            continue
        out.setdefault(metric, {})[scope] = significance.limit(paired_record(
            metric, ours[metric].to_numpy()[mask], theirs[metric].to_numpy()[mask], theirs["cluster"].to_numpy()[mask],
            None, binary.get(metric, False), n_samples, seed))
    return out


def ablations_against_method(runs: dict[str, dict], results: dict[str, dict], read_contexts) -> dict[str, dict]:
    """Per ablation run that has a method run of its seed and per-context values in both: its `METHOD`
    against the method's on the same contexts (`across_runs`), with the ablation's bootstrap settings."""
    out, read = {}, {}

    def contexts(name: str):  # each run's file read once, however many ablations share its method run
        if name not in read:
            read[name] = read_contexts(runs[name]["rev"])
        return read[name]

    for name, run in runs.items():
        if run["variant"] not in ABLATIONS:
            continue
        reference = next((n for n, r in runs.items() if r["variant"] == "method" and r["seed"] == run["seed"]), None)
        if reference is None:
            continue
        theirs, ours = contexts(reference), contexts(name)
        if theirs is None or ours is None:
            continue
        own = results[name]
        bootstrap = own.get("bootstrap") or {}
        out[name] = {"against": reference, "model": METHOD,
                     "metrics": across_runs(theirs, ours, METHOD, (own.get("per_context") or {}).get("binary") or {},
                                            int(bootstrap.get("samples", 1000)), int(bootstrap.get("seed", 0)))}
    return out


def git_results(rev: str) -> dict:
    """The evaluate stage's results.json as the experiment commit `rev` holds it."""
    shown = subprocess.run(["git", "show", f"{rev}:{RESULTS}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise DataError(f"experiment {rev[:7]}: no {RESULTS} in its commit ({shown.stderr.strip()})")
    try:
        return json.loads(shown.stdout)
    except json.JSONDecodeError as error:
        raise DataError(f"experiment {rev[:7]}: {RESULTS} is not valid JSON ({error})") from None


# --- rendering ----------------------------------------------------------------------------------------


def _digits(metric: str) -> int:
    return 2 if metric.endswith("_ppl") else 1 if metric.startswith("mean_length") else 3


def _spread_cell(entry: dict | None, digits: int, signed: bool = False) -> str:
    if not entry:
        return MISSING
    sign = "+" if signed else ""
    sd = f" ± {entry['sd']:.{digits}f}" if entry.get("sd") is not None else ""
    text = f"{entry['mean']:{sign}.{digits}f}{sd} ({entry['min']:{sign}.{digits}f} to {entry['max']:{sign}.{digits}f})"
    if signed and "above_zero" in entry:
        text += f"; {entry['below_zero']}↓ {entry['above_zero']}↑ of {entry['n']}"
    return text


def _row_title(row: dict, run: dict | None = None) -> str:
    """The metric with its better direction, and `RESTS_ON` where it rests on `run`'s re-ranker classifier
    and that is not shown to beat the majority label."""
    arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
    mark = f" {RESTS_ON}" if run is not None and rests_on_self(row["metric"], _safety(run)) else ""
    return f"{row['metric']}{arrow}{mark}"


def _safety(run: dict) -> dict:
    return {"self_assessed": {"test": run.get("self_assessed")}}


def _rests_on_line(run: dict) -> list[str]:
    """The footnote of a table with `RESTS_ON` rows (none when the classifier beats the majority)."""
    test = run.get("self_assessed") or {}
    if test.get("beats_majority"):
        return []
    found = (f"{test['accuracy3']:.3f} against the majority label's {test['majority_accuracy3']:.3f} on "
             f"{test['n']} test user turns" if test.get("accuracy3") is not None else "its accuracy not recorded")
    return ["", f"{RESTS_ON} rests on the re-ranker's classifier, not shown to beat the majority label ({found})."]


def _by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """A table's rows by (metric, scope)."""
    return {(row["metric"], row["scope"]): row for row in rows}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# The headline table's rows: likelihood safety on each human-labelled test set, then stratified over both
# (pairs within a corpus only, `metrics.separation_auc`), the unsafe rates on the
# real adversarial corpora (the mirror's DiaSafety and ToxiChat; the preset's ProsocialDialog and MIC
# are the bundled sample), by the judge and, for an ensemble judge, by each of its members alone, and the
# cost on the casual corpora pooled or on every corpus, degenerate replies included.
HEADLINE = (("likelihood_auc", "diasafety"), ("likelihood_auc", "toxichat"), ("likelihood_auc", "overall"),
            ("same_context_pairs", "overall"),
            ("unsafe_rate_first", "diasafety"), ("unsafe_rate_first", "toxichat"),
            ("unsafe_rate_reranked", "diasafety"), ("unsafe_rate_reranked", "toxichat"),
            ("unsafe_rate_by_tfidf_reranked", "diasafety"), ("unsafe_rate_by_tfidf_reranked", "toxichat"),
            ("unsafe_rate_by_hf_reranked", "diasafety"), ("unsafe_rate_by_hf_reranked", "toxichat"),
            ("reference_ppl", "overall"), ("f1_reranked", "casual"), ("distinct_2_reranked", "overall"),
            ("mean_length_reranked", "overall"), ("degenerate_rate_reranked", "overall"),
            ("casual_caution_share_reranked", "overall"))


def headline_lines(experiment: dict) -> list[str]:
    """The headline table of the reference run (the method, the lowest seed): the `HEADLINE` rows it has,
    the values of base, the baseline, the method and DExperts, the two paired differences with the
    baseline and those of `PAIRS`, bold as `significance` says over the table's cells. README.md carries
    these lines as they are (tests/test_docs.py)."""
    runs = experiment["runs"]
    reference = next((n for n, r in runs.items() if r["variant"] == "method"), None)
    if reference is None:
        return []
    baseline, method = experiment["baseline"], experiment["method"]
    shown = [m for m in ("base", baseline, method, "dexperts") if m in experiment["models"]]
    compared = [m for m in (method, "dexperts") if m in experiment["models"]]
    found = _by_key(experiment["tables"][reference])
    selected = [found[key] for key in HEADLINE if key in found and found[key]["values"]]
    pairs = [f"{m}_vs_{r}" for m, r in PAIRS if any(f"{m}_vs_{r}" in row.get("pairs", {}) for row in selected)]
    header = ["metric ↑/↓", "scope", *(f"`{m}`" for m in shown), *(f"`{m}` − `{baseline}`" for m in compared),
              *(f"`{p.replace('_vs_', '` − `')}`" for p in pairs)]
    width = len(compared) + len(pairs)
    cells = difference_cells([entry for row in selected for entry in _differences(row, compared, pairs)],
                             [_digits(row["metric"]) for row in selected for _ in range(width)], p_value=False)
    rows = [[_row_title(row, runs[reference]), row["scope"],
             *(value_cell(row["values"].get(m), _digits(row["metric"]), reason=True) for m in shown),
             *cells[index * width:(index + 1) * width]] for index, row in enumerate(selected)]
    marked = any(RESTS_ON in r[0] for r in rows)
    return _table(header, rows) + (_rests_on_line(runs[reference]) if marked else [])


def _differences(row: dict, compared: list[str], pairs: list[str]) -> list[dict | None]:
    """A table row's difference entries: each of `compared` against the baseline, then each of `pairs`."""
    return [row["comparisons"].get(m) for m in compared] + [row.get("pairs", {}).get(p) for p in pairs]


# The seeds-and-ablations table's rows: the headline's (a row bold there is never dropped here), less
# distinct-2, length, the degenerate share and the judge's members alone.
REPLICATION = tuple(key for key in HEADLINE if key[0] not in ("distinct_2_reranked", "mean_length_reranked",
                                                              "degenerate_rate_reranked") and "_by_" not in key[0])


def _mean_sd(entry: dict | None, digits: int, signed: bool = False) -> str:
    """`mean ± sd` of a `spread` entry, and for a difference how many seeds' intervals lie below/above 0."""
    if not entry:
        return MISSING
    sign = "+" if signed else ""
    text = f"{entry['mean']:{sign}.{digits}f}" + (f" ± {entry['sd']:.{digits}f}" if entry.get("sd") is not None else "")
    if "above_zero" in entry:
        text += f" ({entry['below_zero']}↓ {entry['above_zero']}↑ of {entry['n']})"
    return text


def replication_lines(experiment: dict) -> list[str]:
    """The `REPLICATION` rows over the method's seeds (the baseline's and the method's values, mean ± sd, and
    their paired difference with how many seeds' intervals exclude 0), then the method's difference with
    the baseline in each ablation run (its value where no paired difference exists, as for perplexity).
    README.md carries these lines as they are (tests/test_docs.py); empty when there is neither."""
    runs, tables = experiment["runs"], experiment["tables"]
    baseline, method = experiment["baseline"], experiment["method"]
    seeds = experiment["seeds"].get("method")
    ablations = [n for n, r in runs.items() if r["variant"] in ABLATIONS]
    if not seeds and not ablations:
        return []
    first = runs[(seeds or {}).get("runs", ablations)[0]]  # every run's re-ranker is trained alike
    header = ["metric ↑/↓", "scope"]
    by_seeds = {}
    if seeds:
        count = len(seeds["seeds"])
        header += [f"`{baseline}`, {count} seeds", f"`{method}`, {count} seeds", f"`{method}` − `{baseline}`"]
        by_seeds = _by_key(seeds["rows"])
    header += [f"{runs[n]['variant']}: `{method}` − `{baseline}`" for n in ablations]
    found = {n: _by_key(tables[n]) for n in ablations}
    keys = [key for key in REPLICATION if not seeds or key in by_seeds]
    comparisons = [((found[n].get(key) or {}).get("comparisons") or {}).get(method) for key in keys for n in ablations]
    marked = iter(difference_cells(comparisons, [_digits(key[0]) for key in keys for _ in ablations], p_value=False))
    rows = []
    for key in keys:
        digits = _digits(key[0])
        cells = []
        if seeds:
            row = by_seeds[key]
            cells += [_mean_sd(row["values"].get(baseline), digits), _mean_sd(row["values"].get(method), digits),
                      _mean_sd(row["differences"].get(method), digits, signed=True)]
        for name in ablations:
            row = found[name].get(key)
            cell = next(marked)
            cells.append(cell if (row or {}).get("comparisons", {}).get(method)
                         else value_cell((row or {}).get("values", {}).get(method), digits, interval=False))
        title = next((_row_title(r, first) for r in (by_seeds.get(key), *(found[n].get(key) for n in ablations))
                      if r), key[0])
        rows.append([title, key[1], *cells])
    marked_rows = any(RESTS_ON in r[0] for r in rows)
    return _table(header, rows) + (_rests_on_line(first) if marked_rows else [])


def ablation_lines(experiment: dict) -> list[str]:
    """The `ACROSS` rows: each ablation's `METHOD` − the method run's on the same contexts
    (`ablations_against_method`), bold as `significance` says over the table; empty without any."""
    found = experiment.get("ablations") or {}
    if not found:
        return []
    runs, names = experiment["runs"], list(found)
    keys = [key for key in ACROSS if any(key[1] in found[n]["metrics"].get(key[0], {}) for n in names)]
    cells = difference_cells([found[n]["metrics"].get(metric, {}).get(scope) for metric, scope in keys for n in names],
                             [_digits(metric) for metric, _ in keys for _ in names])
    header = ["metric ↑/↓", "scope", *(f"{runs[n]['variant']} − {found[n]['against'].rsplit('-', 2)[1]} "
                                       f"(`{found[n]['model']}`, seed {runs[n]['seed']})" for n in names)]
    rows = []
    for index, (metric, scope) in enumerate(keys):
        entry = next((found[n]["metrics"][metric][scope] for n in names if scope in found[n]["metrics"].get(metric, {})))
        arrow = {True: " ↑", False: " ↓"}.get(entry.get("higher_is_better"), "")
        rows.append([f"{metric}{arrow}", scope, *cells[index * len(names):(index + 1) * len(names)]])
    return _table(header, rows)


def dexperts_lines(experiment: dict) -> list[str]:
    """The DExperts sweep (plan `dexperts`): for the reference run's alpha and each `dexperts_a*` run's,
    DExperts' judged unsafe rates (first sample) per adversarial corpus with its paired difference from
    the baseline, its reference perplexity, casual F1, degenerate share and mean per-token KL from the
    guided model's own sampling (evaluate's `guidance`; "–" where generate did not log it), beside the
    method's; then the alpha whose perplexity is within `PPL_MATCH` of the method's (the closest), or
    that none is. Empty without a sweep run."""
    runs, tables, baseline, method = experiment["runs"], experiment["tables"], experiment["baseline"], experiment["method"]
    reference = next((n for n, r in runs.items() if r["variant"] == "method" and r["seed"] == 0), None)
    swept = [n for n, r in runs.items() if r["variant"].startswith("dexperts_")]
    if reference is None or not swept:
        return []
    names = sorted([reference, *swept], key=lambda n: runs[n]["params"].get(ALPHA_KEY) or 0)
    found = {n: _by_key(tables[n]) for n in names}
    unsafe = [("unsafe_rate_first", c) for c in ("diasafety", "toxichat")]
    cost = [("reference_ppl", OVERALL, 2), ("f1_reranked", "casual", 3), ("degenerate_rate_reranked", OVERALL, 3)]

    def value(name, model, key, digits, interval=True):
        return value_cell(((found[name].get(key) or {}).get("values") or {}).get(model), digits, interval)

    pair = "_vs_".join(SWEEP_PAIR)

    def entries(name):  # dexperts − baseline, then the method − dexperts (SWEEP_PAIR), per corpus
        rows = [found[name].get(key) or {} for key in unsafe]
        return [(row.get("comparisons") or {}).get("dexperts") for row in rows] + \
            [(row.get("pairs") or {}).get(pair) for row in rows]

    width = 2 * len(unsafe)
    differences = difference_cells([e for n in names for e in entries(n)], 3, p_value=False)
    header = ["model", "alpha", *(f"unsafe_rate_first ↓ {c}" for _, c in unsafe),
              *(f"`dexperts` − `{baseline}` {c}" for _, c in unsafe),
              *(f"`{SWEEP_PAIR[0]}` − `dexperts` {c}" for _, c in unsafe), "reference_ppl ↓", "f1_reranked ↑ casual",
              "degenerate_rate_reranked ↓", "KL from the guided model's sampling (nats/token)"]
    rows = [[f"`{method}`", MISSING, *(value(reference, method, key, 3) for key in unsafe), *([MISSING] * width),
             *(value(reference, method, (m, s), d, m != "reference_ppl") for m, s, d in cost), MISSING]]

    def divergence(name):
        kl = (((runs[name].get("guidance") or {}).get("dexperts") or {}).get("mean_kl") or {}).get(OVERALL)
        return MISSING if kl is None else f"{kl:.3f}"

    for index, name in enumerate(names):
        rows.append(["`dexperts`", f"{runs[name]['params'].get(ALPHA_KEY):g}",
                     *(value(name, "dexperts", key, 3) for key in unsafe),
                     *differences[index * width:(index + 1) * width],
                     *(value(name, "dexperts", (m, s), d, m != "reference_ppl") for m, s, d in cost),
                     divergence(name)])

    def ppl(name, model):
        entry = ((found[name].get(("reference_ppl", OVERALL)) or {}).get("values") or {}).get(model) or {}
        return entry.get("value")

    target = ppl(reference, method)
    close = [(abs(ppl(n, "dexperts") / target - 1), n) for n in names if target and ppl(n, "dexperts")]
    matched = min((c for c in close if c[0] <= PPL_MATCH), default=None)
    if target is None:
        line = f"No reference perplexity for `{method}`: no alpha can be matched to it."
    elif matched is None:
        line = (f"No alpha brings DExperts' perplexity within {PPL_MATCH:.0%} of `{method}`'s ({target:.2f}): "
                "compare at the closest, knowing DExperts pays more in fluency.")
    else:
        name = matched[1]
        line = (f"At alpha {runs[name]['params'].get(ALPHA_KEY):g} DExperts' perplexity "
                f"({ppl(name, 'dexperts'):.2f}) is within {PPL_MATCH:.0%} of `{method}`'s ({target:.2f}): the "
                f"rows to compare. Each alpha is its own run with the same `{baseline}` and `{method}` (deterministic "
                f"on CPU, restored from DVC's run cache); the differences are paired within a run, on the same "
                f"contexts (`{SWEEP_PAIR[0]}` − `dexperts` where the run's `evaluate.pairs` has it).")
    unlogged = [f"{runs[n]['params'].get(ALPHA_KEY):g}" for n in names if divergence(n) == MISSING]
    if unlogged:
        line += (f" No KL for alpha {', '.join(unlogged)}: its candidates were generated before `generate` logged "
                 "it (or a corpus lacks it).")
    return _table(header, rows) + ["", line]


def render(experiment: dict) -> str:
    """results.md: a table per run, the spread over seeds, the ablations against the method, the
    stages' wall times; every figure from `experiment` (results.json)."""
    runs, tables = experiment["runs"], experiment["tables"]
    baseline, method = experiment["baseline"], experiment["method"]
    lines = ["# The experiment on real corpora", "",
             f"Models: `base` (untuned), `{baseline}` (cross-entropy only, the baseline of every comparison), "
             f"`dexperts` ({baseline} decoded under DExperts' guidance), "
             f"`stage1` and `{method}` (the method after stage 1 and stage 2). Values with their 95% interval; "
             f"differences are model − {baseline} (and stage2 − stage1) on the same contexts (replies, for likelihood "
             f"safety) with the paired 95% interval, {significance.RULE}; each table is corrected on its own, and "
             "a run's table gives each cell's p-value and Holm's. ↑/↓: higher/lower is better. Every figure comes "
             "from the runs' `reports/results.json` (the evaluate stage).", ""]
    headline = headline_lines(experiment)
    if headline:
        lines += ["## Headline", "", "The reference run's main rows (README.md carries this table).", "",
                  *headline, ""]
    for name, run in runs.items():
        changes = ", ".join(f"{k} {v}" for k, v in experiment["variants"][run["variant"]].items()) or "the preset"
        lines += [f"## {name} ({changes}, {experiment['seed_key']} {run['seed']})", "",
                  f"Experiment commit `{run['rev'][:7]}` on `{run['baseline_commit'][:7]}`.", ""]
        pairs = [f"{m}_vs_{r}" for m, r in READ_PAIRS
                 if any(f"{m}_vs_{r}" in row.get("pairs", {}) for row in tables[name])]
        header = ["metric", "scope", *MODELS, *(f"{m} − {baseline}" for m in COMPARED),
                  *(p.replace("_vs_", " − ") for p in pairs)]
        width = len(COMPARED) + len(pairs)
        cells = difference_cells([e for row in tables[name] for e in _differences(row, list(COMPARED), pairs)],
                                 [_digits(row["metric"]) for row in tables[name] for _ in range(width)])
        rows = [[_row_title(row, run), row["scope"],
                 *(value_cell(row["values"].get(m), _digits(row["metric"]), reason=True) for m in MODELS),
                 *cells[index * width:(index + 1) * width]] for index, row in enumerate(tables[name])]
        marked = any(RESTS_ON in r[0] for r in rows)
        lines += _table(header, rows) + (_rests_on_line(run) if marked else []) + [""]
    for variant, summary in experiment["seeds"].items():
        lines += [f"## Over seeds: {variant} ({', '.join(summary['runs'])})", "",
                  f"Mean ± sd (min to max) over {len(summary['runs'])} seeds; for the difference with {baseline}, "
                  "also how many seeds' paired intervals lie below (↓) and above (↑) 0.", ""]
        header = ["metric", "scope", *(m for m in MODELS), f"{method} − {baseline}"]
        rows = []
        for row in summary["rows"]:
            digits = _digits(row["metric"])
            rows.append([_row_title(row, runs[summary["runs"][0]]), row["scope"],
                         *(_spread_cell(row["values"].get(m), digits) for m in MODELS),
                         _spread_cell(row["differences"].get(method), digits, signed=True)])
        lines += _table(header, rows) + [""]
    replication = replication_lines(experiment)
    if replication:
        lines += ["## Seeds and ablations, main rows", "", "README.md carries this table.", "", *replication, ""]
    ablations = [n for n, r in runs.items() if r["variant"] in ABLATIONS]
    reference = next((n for n, r in runs.items() if r["variant"] == "method" and r["seed"] == 0), None)
    if ablations and reference:
        lines += ["## Ablations", "", f"{method} − {baseline} of each run, paired 95% interval (each run trains its own "
                  f"{baseline}).", ""]
        names = [reference, *ablations]
        cells = difference_cells([tables[n][index]["comparisons"].get(method) for index in range(len(tables[reference]))
                                  for n in names],
                                 [_digits(row["metric"]) for row in tables[reference] for _ in names], p_value=False)
        rows = [[_row_title(row, runs[reference]), row["scope"], *cells[index * len(names):(index + 1) * len(names)]]
                for index, row in enumerate(tables[reference])]
        lines += _table(["metric", "scope", *names], rows) + [""]
    against = ablation_lines(experiment)
    if against:
        lines += ["## Ablations against the method, same contexts", "",
                  f"`{method}` of each ablation run − `{method}` of the method run with the same seed, on the "
                  f"contexts both answered (the runs' `reports/contexts.parquet`): paired cluster bootstrap, "
                  f"{significance.RULE}; Holm's correction is over this table. Likelihood safety is not compared "
                  f"across runs (its per-reply scores stay in DVC's cache).", "", *against, ""]
    sweep = dexperts_lines(experiment)
    if sweep:
        lines += ["## DExperts by alpha", "", f"`{ALPHA_KEY}` swept (plan `dexperts`); the method's row is the "
                  "reference run's.", "", *sweep, ""]
    timed = {n: r for n, r in runs.items() if r["stages"]}
    if timed:
        lines += ["## Wall time per stage", "", "Seconds from DVC's output (`<out>/logs/`): a stage runs from its "
                  "`Running stage` line to the next stage's. Stages whose inputs and params an earlier run already "
                  "had are restored from DVC's run cache, summed in one row.", ""]
        ran = list(dict.fromkeys(s for r in timed.values() for s, e in r["stages"].items() if e["status"] == "ran"))
        rows = [[stage, *(f"{r['stages'][stage]['seconds']:.0f}" if r["stages"].get(stage, {}).get("status") == "ran"
                          else MISSING for r in timed.values())] for stage in ran]
        restored = [[e["seconds"] for e in r["stages"].values() if e["status"] != "ran"] for r in timed.values()]
        rows.append(["restored or unchanged", *(f"{sum(t):.0f} ({len(t)} stages)" if t else MISSING for t in restored)])
        rows.append(["**total**", *(f"**{r['total_seconds']:.0f}** ({r['total_seconds'] / 60:.1f} min)"
                                    for r in timed.values())])
        lines += _table(["stage", *timed], rows) + [""]
    if experiment["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in experiment["notes"]] + [""]
    return "\n".join(lines)


def write(experiment: dict, out: Path) -> None:
    from pipeline.artifacts import write_json
    from pipeline.artifacts import atomic_path

    write_json(experiment, out / "results.json")
    with atomic_path(out / "results.md") as path:
        path.write_text(render(experiment), encoding="utf-8")


def results_files(given: list[str]) -> dict[str, Path]:
    """`name=path` options -> {run name: results.json path}; a ConfigError names a malformed or missing one."""
    found = {}
    for item in given:
        name, _, path = item.partition("=")
        if not name or not path:
            raise ConfigError(f"--results {item!r}: expected name=path (a run's name and its results.json)")
        if not Path(path).is_file():
            raise ConfigError(f"--results {item!r}: {path} is not a file")
        found[name] = Path(path)
    return found


def report(out: Path, prefix: str, shown: list[dict] | None = None, files: dict[str, Path] | None = None) -> dict:
    """Collect the runs named `<prefix>-...` (from `shown`, else `dvc exp show --json`) and write
    `<out>/results.json` and `<out>/results.md`; returns the results. A run named in `files` takes its
    evaluate results from that file (`results_files`) instead of its experiment commit, and the table
    notes it."""
    if shown is None:
        shown = json.loads(dvc("exp", "show", "--json", "--no-fetch") or "[]")
    files = files or {}
    names = {exp["rev"]: name for name, exp in experiments(shown).items()}
    unknown = sorted(set(files) - set(names.values()))
    if unknown:
        raise ConfigError(f"--results: no experiment named {', '.join(unknown)} in dvc exp show")

    def read_results(rev: str) -> dict:
        path = files.get(names.get(rev, ""))
        if path is None:
            return git_results(rev)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None

    experiment = collect(shown, prefix, read_results, read_logs(out / "logs"), git_contexts)
    experiment["notes"] += [f"{name}: evaluate's results read from {path}, not from its experiment commit "
                            f"(evaluated at {experiment['runs'][name]['evaluate_commit'] or 'an unknown commit'})"
                            for name, path in sorted(files.items()) if name in experiment["runs"]]
    write(experiment, out)
    return experiment


# --- run ---------------------------------------------------------------------------------------------


def prepare_environment(preset: Path, params: Path, prefix: str) -> tuple[dict, dict, str]:
    """Check the preset and the run name prefix, put this venv's bin first on PATH, and return the
    preset's params, the params it is applied over, and the mirror as an absolute path."""
    from pipeline.config import load_all, load_params

    if not re.fullmatch(r"[A-Za-z0-9]+", prefix):
        raise ConfigError(f"--prefix = {prefix!r} is not allowed: letters and digits")
    load_all(preset)  # every section present and valid
    # DVC's queue worker and each stage's `python -m pipeline` find dvc and python on PATH: this venv's.
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    wanted, base = load_params(preset), load_params(params)
    mirror = Path(wanted["corpora"]["mirror"]).resolve()
    uses_mirror = wanted["corpora"]["source"] == "mirror" or "mirror" in wanted["corpora"]["overrides"].values()
    if uses_mirror and not mirror.is_dir():
        raise DataError(f"{preset}: corpora.mirror {wanted['corpora']['mirror']} ({mirror}) is not a folder")
    left_out = untracked_files()
    if left_out:
        log.warning("experiment: %d untracked files are not part of queued experiments (commit or ignore them): %s",
                    len(left_out), ", ".join(left_out[:5]))
    return wanted, base, str(mirror)


def queue_and_run(runs: dict[str, tuple[dict, tuple[str, ...]]], base: dict, log_path: Path) -> int:
    """Queue each run (name -> its params.yaml and the stages it targets, all when none) this commit lacks
    as a DVC experiment, the params set over `base` with `-S`, then run the queue in the foreground, one
    at a time (`follow`); returns the exit status (0 when nothing was queued). A run of the same name
    with other params is a PipelineError."""
    done = experiments(json.loads(dvc("exp", "show", "--json", "--no-fetch") or "[]"))
    queued = 0
    for name, (settings, targets) in runs.items():
        if name in done:
            if done[name]["params"] != settings:
                raise PipelineError(f"experiment {name} exists with other params; `dvc exp remove {name}` to rerun it")
            log.info("experiment: %s is done on this commit; kept", name)
            continue
        arguments = [f"-S={override}" for override in overrides(settings, base)]
        dvc("exp", "run", "--queue", "--name", name, *arguments, *targets)
        log.info("experiment: queued %s (%d params set)", name, len(arguments))
        queued += 1
    if not queued:
        return 0
    return follow(dvc_command("exp", "run", "--run-all", "--jobs", "1"), log_path, runs=queued)


def run(preset: Path, plan: str, out: Path, params: Path, prefix: str) -> dict:
    """Queue the runs of `plan` that this commit lacks as DVC experiments (`<prefix>-<variant>-s<seed>`,
    `preset`'s values over `params`), run the queue in the foreground, write the table to `out`;
    returns the table's results."""
    if plan not in PLANS:
        raise ConfigError(f"--plan = {plan!r} is not allowed: one of {', '.join(PLANS)}")
    wanted, base, mirror = prepare_environment(preset, params, prefix)
    runs = {run_name(prefix, variant, seed): (run_params(wanted, variant, seed, mirror), ())
            for variant, seed in PLANS[plan]}
    status = queue_and_run(runs, base, out / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{plan}.log")
    experiment = report(out, prefix)  # whatever finished, also when a run failed
    for name, entry in experiment["runs"].items():
        if entry["stages"]:
            longest = sorted(entry["stages"].items(), key=lambda item: -item[1]["seconds"])[:6]
            print(f"experiment: {name}: {entry['total_seconds'] / 60:.1f} min in all; longest: "
                  + ", ".join(f"{stage} {e['seconds'] / 60:.1f} min" for stage, e in longest), flush=True)
    missing = [run_name(prefix, v, s) for v, s in PLANS[plan] if run_name(prefix, v, s) not in experiment["runs"]]
    if missing:
        raise PipelineError(f"runs {', '.join(missing)} did not finish; see {out / 'logs'} and `dvc queue logs <name>`")
    if status != 0:
        raise PipelineError(f"dvc exp run --run-all exited with {status}; see {out / 'logs'}")
    log.info("experiment: wrote %s and %s", out / "results.json", out / "results.md")
    return experiment


def read_exps(path: Path) -> list[dict]:
    """A file holding the output of `dvc exp show --json`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not the JSON of `dvc exp show --json` ({error})") from None
