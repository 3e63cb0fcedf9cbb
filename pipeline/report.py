"""The reports: `report.md` and the plots, rendered from the contents of results.json, `ratings.md`
from ratings.json, and the audit's `report.md` from its results.json.

`pipeline/stages/evaluate.py` computes results.json and calls `write_report`; nothing here computes
a metric. Every number in the report is read from the results dict (the training-curve plot from the
dvclive logs evaluate read), so `render_report(json.load(open("reports/results.json")))` re-renders
a saved report. Likewise `pipeline/stages/ratings.py` and `write_ratings_report` / `render_ratings`, and
`pipeline/stages/audit_report.py` and `write_audit_report` / `render_audit`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline import significance
from pipeline.artifacts import atomic_path
from pipeline.labels import THREE_WAY

MISSING = "–"
VERDICT_SOURCES = {"judge": "the independent safety judge", "self-assessed": "the re-ranker's own classifier"}
LABEL_COLOURS = {"casual": "#4c9f70", "needs_caution": "#e0a526", "needs_intervention": "#c8443a"}
# Column titles of the comparison table, by metric name without its view.
TITLES = {"unsafe_rate": "unsafe rate (judge)", "self_assessed_unsafe_rate": "self-assessed unsafe rate",
          "casual_rot_share": "casual RoT share",
          "casual_caution_share": "casual caution share", "bleu4": "BLEU-4", "f1": "F1", "rouge_l": "ROUGE-L",
          "rot_f1": "RoT F1", "rot_bleu4": "RoT BLEU-4", "mean_length": "length"}


def write_report(results: dict, curves: dict, reports_dir: Path) -> None:
    """Write `report.md` and the plots named in `results["plots"]` under `reports_dir`, atomically."""
    with atomic_path(reports_dir / "report.md") as temp:
        temp.write_text(render_report(results), encoding="utf-8")
    plot_label_distribution(results, reports_dir / results["plots"]["label_distribution"])
    plot_training_curves(curves, reports_dir / results["plots"]["training_curves"])


# --- cells and tables -----------------------------------------------------------------------------


def _digits(name: str) -> int:
    return 2 if "bleu4" in name or name.endswith("_ppl") else 1 if name.startswith("mean_length") else 3


def value_cell(entry: dict | None, digits: int, interval: bool = True, reason: bool = False) -> str:
    """`v [low, high]` (the interval where there is one, `interval`, and enough clusters: see
    `significance`); a missing value is `–`, with the entry's reason when `reason`."""
    if not entry or entry.get("value") is None:
        return f"{MISSING} ({entry['reason']})" if reason and entry and entry.get("reason") else MISSING
    text = f"{entry['value']:.{digits}f}"
    if interval and entry.get("ci") and not significance.too_few(entry):
        low, high = entry["ci"]
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def difference_cell(entry: dict | None, digits: int, p_value: bool = True, mark: dict | None = None) -> str:
    """`+d [low, high]`, bold when `mark` (`significance.marks` over the cells of the table; alone when
    not given) calls it significant, with its p-value (and Holm's) when `p_value`. No interval or test
    where the scope has too few clusters."""
    if not entry or entry.get("difference") is None:
        return MISSING
    text = f"{entry['difference']:+.{digits}f}"
    if significance.too_few(entry):
        return text + f" (n<{significance.MIN_CLUSTERS})"
    mark = mark or significance.marks([entry])[0]
    if entry.get("ci"):
        low, high = entry["ci"]
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
        if mark["significant"]:
            text = f"**{text}**"
    if p_value and mark["p"] is not None:
        text += f" p{_p_text(mark['p'])}"
        if mark["p_holm"] != mark["p"]:
            text += f" (Holm {_p_text(mark['p_holm']).lstrip('=')})"
    return text


def _p_text(p: float) -> str:
    """`=0.012`, or `<1e-06` for a p-value results.json rounded to 0 (it keeps six decimals)."""
    return "<1e-06" if p < 1e-6 else f"={p:.2g}"


def difference_cells(entries: list[dict | None], digits: list[int] | int, p_value: bool = True) -> list[str]:
    """`difference_cell` of every entry of one table, Holm-corrected over them together."""
    digits = digits if isinstance(digits, list) else [digits] * len(entries)
    return [difference_cell(entry, places, p_value, mark)
            for entry, places, mark in zip(entries, digits, significance.marks(entries))]


def _arrow(better: bool | None) -> str:
    return {True: " ↑", False: " ↓"}.get(better, "")


def _direction(results: dict, scope: str, metric: str) -> bool | None:
    """A metric's higher_is_better as results.json records it; `metric` may take `{view}`."""
    for model in results["models"]:
        entries = results["metrics"].get(model, {}).get(scope, {})
        for view in results["views"]:
            entry = entries.get(metric.format(view=view))
            if entry is not None:
                return entry.get("higher_is_better")
    return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _short(text: str, limit: int = 60) -> str:
    """A reply as a Markdown table cell: no pipes, at most `limit` characters."""
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _metric_table(results: dict, scope: str, columns: list[tuple[str, str, int]], per_view: bool,
                  count: str | None = None) -> list[str]:
    """A table with a row per model (and reply, when `per_view`); columns are (title, metric, digits),
    the metric name taking `{view}`. Empty list when every cell is null."""
    views = results["views"]
    header = ["model"] + (["reply"] if per_view else []) + [title + _arrow(_direction(results, scope, metric))
                                                            for title, metric, _ in columns]
    if count:
        header.append("contexts")
    rows, filled = [], False
    for model in results["models"]:
        entries = results["metrics"].get(model, {}).get(scope)
        if entries is None:
            continue
        for view in views if per_view else (None,):
            cells = [value_cell(entries.get(metric.format(view=view)), digits) for _, metric, digits in columns]
            filled |= any(cell != MISSING for cell in cells)
            row = [model] + ([views[view]] if per_view else []) + cells
            if count:
                row.append(str(entries.get(count.format(view=view), {}).get("n", MISSING)))
            rows.append(row)
    return _table(header, rows) if filled else []


def _title(results: dict, name: str) -> str:
    """A metric's column title: `unsafe_rate_reranked` -> "unsafe rate, re-ranked"."""
    for view, view_name in results["views"].items():
        if name.endswith(f"_{view}"):
            base = name[:-len(view) - 1]
            return f"{TITLES.get(base, base.replace('_', ' '))}, {view_name}"
    return TITLES.get(name, name.replace("_", " "))


# --- the report -----------------------------------------------------------------------------------


def render_report(results: dict) -> str:
    """The Markdown report, from the contents of results.json alone."""
    lines = ["# Evaluation report", ""]
    commit = results.get("git_commit") or "unknown"
    bootstrap = results.get("bootstrap") or {}
    baseline = (results.get("comparisons") or {}).get("baseline")
    lines += [f"Rendered from `results.json` (git commit `{commit}`). Shares, F1 and ROUGE-L are in 0–1, BLEU-4 "
              "in 0–100 (sacrebleu, against every reference of the context), lengths in tokens. `[low, high]` "
              f"is a percentile bootstrap 95% interval ({bootstrap.get('samples', '?')} resamples) that draws "
              f"clusters of contexts ({bootstrap.get('clusters', 'dialogues')}), not single contexts; ↑ / ↓ mark "
              "the better direction. *first sample*: the first of the k sampled candidates; *re-ranked*: the "
              "re-ranker's choice among them."
              + (f" Comparisons are paired against `{baseline}` on the contexts both models answered." if baseline
                 else ""), ""]
    lines += _classifier_lines(results.get("safety") or {})
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    for scope in results["scopes"]:
        pooled = scope not in results["corpora"]
        title = ("Overall (all corpora pooled)" if scope == "overall" else f"{scope.capitalize()} corpora pooled"
                 if pooled else scope)
        lines += [f"## {title}", ""]
        lines += _comparison_lines(results, scope)
        safety = _metric_table(results, scope, [("unsafe rate (judge)", "unsafe_rate_{view}", 3),
                                                ("degenerate", "degenerate_rate_{view}", 3),
                                                ("sound", "sound_rate_{view}", 3),
                                                ("self-assessed unsafe rate", "self_assessed_unsafe_rate_{view}", 3),
                                                ("agreement", "judge_self_agreement_{view}", 3),
                                                ("κ", "judge_self_kappa_{view}", 3)],
                               per_view=True, count="unsafe_rate_{view}")
        labels = _metric_table(results, scope, [("casual", "label_casual_{view}", 3),
                                                ("needs caution", "label_needs_caution_{view}", 3),
                                                ("needs intervention", "label_needs_intervention_{view}", 3)],
                               per_view=True)
        lines += ["### Safety of the replies", "",
                  "*unsafe rate (judge)*: the independent judge's verdict, the headline; *degenerate*: empty, "
                  "repetitive or not words, counted apart whatever the judge says; *sound*: neither unsafe nor "
                  "degenerate (a model does not become safe by saying nothing); *self-assessed*: the "
                  "re-ranker's own classifier (needs caution or intervention), which the re-ranked choice was "
                  "picked to please; *agreement*: the share of replies both call unsafe or both safe; κ: "
                  "Cohen's kappa of the two verdicts (– where one of them is constant).", "", *safety, "",
                  "Predicted labels (self-assessed):", "", *labels, ""]
        lines += _members_lines(results, scope)
        overlap = _metric_table(results, scope, [("BLEU-4", "bleu4_{view}", 2), ("F1", "f1_{view}", 3),
                                                 ("ROUGE-L", "rouge_l_{view}", 3),
                                                 ("distinct-1", "distinct_1_{view}", 3),
                                                 ("distinct-2", "distinct_2_{view}", 3),
                                                 ("length", "mean_length_{view}", 1)], per_view=True)
        reference = next((results["metrics"][m][scope] for m in results["models"]
                          if (results["metrics"].get(m, {}).get(scope, {}).get("mean_length_reference") or {})
                          .get("value") is not None), None)
        if overlap and reference:
            overlap.append("| reference | | | | | " + " | ".join(
                value_cell(reference.get(name), digits) for name, digits in
                (("distinct_1_reference", 3), ("distinct_2_reference", 3), ("mean_length_reference", 1))) + " |")
        lines += ["### Overlap with the references, diversity, length", "", *overlap, ""]
        rot_quality = _metric_table(results, scope, [("RoT BLEU-4", "rot_bleu4_{view}", 2),
                                                     ("RoT F1", "rot_f1_{view}", 3)],
                                    per_view=True, count="rot_f1_{view}")
        lines += ["### Rules-of-thumb against the gold RoTs", "",
                  *(rot_quality or ["*No gold rules-of-thumb in these contexts.*"]), ""]
        rot_share = _metric_table(results, scope, [(label.replace("_", " "), f"rot_share_{label}", 3)
                                                   for label in results["context_labels"]], per_view=False)
        lines += ["### Share of candidates that carry a RoT, by the context's safety label", "",
                  *(rot_share or ["*No candidates.*"]), ""]
        caution = _metric_table(results, scope, [("RoT share", "casual_rot_share_{view}", 3),
                                                 ("caution share", "casual_caution_share_{view}", 3),
                                                 ("distinct-1", "casual_distinct_1_{view}", 3),
                                                 ("distinct-2", "casual_distinct_2_{view}", 3)],
                                per_view=True, count="casual_rot_share_{view}")
        lines += ["### Over-caution on casual contexts", "",
                  "Contexts labelled casual, and every context of the four casual corpora. *RoT share*: "
                  "replies that carry a RoT; *caution share*: replies that the re-ranker's classifier "
                  "(self-assessed) rates as needing caution or intervention themselves.", "",
                  *(caution or ["*No casual contexts.*"]), ""]
        lines += _generic_table(results, scope)
        if pooled:
            scores = _metric_table(results, scope, [("reference perplexity", "reference_ppl", 2),
                                                    ("group ranking accuracy", "group_ranking_accuracy", 3)],
                                   per_view=False)
            if scores:
                lines += ["### Model scores", "", *scores, ""]
    lines += _likelihood_lines(results.get("likelihood") or {})
    lines += _control_lines(results.get("controls") or {})
    plots = results.get("plots") or {}
    if plots:
        lines += ["## Plots", ""]
        for name, path in sorted(plots.items()):
            lines += [f"![{name.replace('_', ' ')}]({path})", ""]
    human = results.get("human_eval")
    if human:
        lines += ["## Human evaluation", "",
                  f"`{human['sheet']}` holds {human['items']} blinded pairs (context, response A, response B); "
                  f"raters fill {', '.join(human['ratings'])} with A, B or tie. `{human['key']}` says which model "
                  "wrote each response; keep it away from the raters. Each rater's filled copy goes to "
                  "`data/ratings/<rater>.csv`; the `ratings` stage (`python -m pipeline ratings`) reads them back "
                  "into `reports/ratings/`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _members_lines(results: dict, scope: str) -> list[str]:
    """### The judges side by side: an ensemble judge's members alone on the same replies, and how often the
    first two agree; nothing for a single judge."""
    kinds = results.get("judge_members") or []
    table = _metric_table(results, scope, [("unsafe rate (judge)", "unsafe_rate_{view}", 3),
                                           *((f"unsafe rate ({kind} alone)", f"unsafe_rate_by_{kind}_{{view}}", 3)
                                             for kind in kinds),
                                           ("agreement", "judges_agreement_{view}", 3),
                                           ("κ", "judges_kappa_{view}", 3)], per_view=True) if kinds else []
    if not table:
        return []
    return ["### The judges side by side", "",
            f"The judge is the mean of {' and '.join(f'`{kind}`' for kind in kinds)}'s P(unsafe); each alone on the "
            f"same replies (the first sample's rate over the context's k samples, as the judge's), their "
            f"*agreement* (the share of replies both call unsafe or both safe) and Cohen's κ.", "", *table, ""]


CONTROL_NAMES = {"human_safe": "humans' safe test replies", "human_unsafe": "humans' unsafe test replies",
                 "reference": "the context's reference", "shuffled_reference": "its words shuffled",
                 "empty": "an empty reply", "repeated_word": "one word repeated", "agreement": "a generic agreement",
                 "apology": "a generic apology"}


def _control_lines(found: dict) -> list[str]:
    """## Controls: the judge's unsafe rate and the degenerate share of fixed replies in the same contexts."""
    results = found.get("results") or {}
    if not results:
        return []
    scopes = [s for s in ("adversarial", "diasafety", "toxichat", "casual", "overall")
              if any(s in entries for entries in results.values())]
    rows = [[f"{CONTROL_NAMES.get(name, name)} (`{name}`)",
             *(value_cell((entries.get(scope) or {}).get("unsafe_rate"), 3) for scope in scopes),
             value_cell((entries.get("overall") or {}).get("degenerate_rate"), 3, interval=False)]
            for name, entries in sorted(results.items(), key=lambda item: list(CONTROL_NAMES).index(item[0]))]
    replies = found.get("replies") or {}
    return ["## Controls: what the judge rewards", "",
            f"Fixed replies judged in the contexts `{found.get('of')}` answered, and humans' labelled test replies: "
            "a judge that reads the context calls an agreement unsafe more often on adversarial contexts than on "
            "casual ones, and gives no shuffled or repeated text the verdict of a good reply; a degenerate reply "
            f"is counted apart in every model's row. The agreement: \"{replies.get('agreement', '')}\"; the "
            f"apology: \"{replies.get('apology', '')}\"; the repeated word: \"{replies.get('repeated_word', '')[:20]}...\".",
            "", *_table(["control", *(f"unsafe rate, {scope}" for scope in scopes), "degenerate share"], rows), ""]


LIKELIHOOD_NAMES = {"likelihood_auc": "likelihood AUC ↑", "same_context_pairs": "same-context pairs ranked right ↑"}


def _likelihood_lines(found: dict) -> list[str]:
    """## Likelihood safety: per model and corpus, how well its length-normalised log-likelihood separates
    humans' safe replies from their unsafe ones, and each model against the baseline on the same replies."""
    metrics, comparisons, baseline = found.get("metrics") or {}, found.get("comparisons") or {}, found.get("baseline")
    if not metrics:
        return []
    scopes = list(dict.fromkeys(scope for names in metrics.values() for entries in names.values() for scope in entries))
    lines = ["## Likelihood safety (human-labelled test replies, `score`)", "",
             "The model's mean log-probability of each reply given its context, on DiaSafety's and ToxiChat's "
             "human-labelled test replies: *likelihood AUC* is P(a safe reply outscores an unsafe one), "
             "*same-context pairs* the share of (safe, unsafe) replies to one context ranked right (ties half)."
             + (f" Differences are paired against `{baseline}` on the same replies, {significance.RULE}; Holm's "
                "correction is over each table." if baseline else ""), ""]
    for name, title in LIKELIHOOD_NAMES.items():
        header = ["model", *scopes] + ([f"− {baseline}, {scope}" for scope in scopes] if comparisons else [])
        cells = difference_cells([((comparisons.get(model) or {}).get(scope) or {}).get(name)
                                  for model in metrics for scope in scopes], 3)
        rows = []
        for index, (model, names) in enumerate(metrics.items()):
            row = [f"`{model}`", *(value_cell((names.get(name) or {}).get(scope), 3) for scope in scopes)]
            if comparisons:
                row += cells[index * len(scopes):(index + 1) * len(scopes)]
            rows.append(row)
        lines += [f"### {title}", "", *_table(header, rows), ""]
    return lines


def _counts(counts: dict) -> str:
    """`{name: n}` as "name (n), ..." in name order (results.json stores its keys sorted, so only an
    order made here survives a reload)."""
    return ", ".join(f"{name} ({count:,})" for name, count in sorted(counts.items()))


def _judge_corpora(judge: dict) -> str:
    """The corpora that trained the judge, in `judge.corpora` order, each with its labelled replies."""
    return ", ".join(f"{corpus} ({judge['training_examples'].get(corpus, 0):,})" for corpus in judge["corpora"])


def self_assessed_test(own: dict) -> str:
    """How the re-ranker's classifier does on its test split's user turns against the majority label,
    and what rests on it when it does not beat the majority."""
    test = own.get("test") or {}
    if test.get("accuracy3") is None:
        found = "Its accuracy against the majority label was not recorded"
    else:
        found = (f"Three-way accuracy on its {test['n']} test user turns {test['accuracy3']:.3f}, the majority "
                 f"label's {test['majority_accuracy3']:.3f}")
    if test.get("beats_majority"):
        return found + "."
    return (found + f": the re-ranked replies' rates and the caution share rest on a classifier not shown to beat "
            f"the majority label ({RESTS_ON} in the tables).")


RESTS_ON = "†"


def rests_on_self(metric: str, safety: dict | None) -> bool:
    """True when `metric` rests on a re-ranker classifier that is not shown to beat the majority label:
    the unsafe rate of the re-ranked choice (the classifier picked it), by the judge or by one of its
    members, and the caution share (the classifier rates it)."""
    own = (safety or {}).get("self_assessed") or {}
    resting = (metric.startswith("unsafe_rate_") and metric.endswith("_reranked")) or metric.startswith(
        "casual_caution_share")
    return resting and not (own.get("test") or {}).get("beats_majority")


def _classifier_lines(safety: dict) -> list[str]:
    """Which corpora trained the judge, the re-ranker's classifier and the stage-1 negatives."""
    if not safety:
        return []
    judge, own, stage1 = safety["judge"], safety["self_assessed"], safety["stage1_negatives"]
    unsafe = sum(judge["training_unsafe"].values())
    return ["## Who judges safety", "",
            f"- **Judge** (the headline unsafe rate; `{judge['folder']}`, {judge['kind']}): trained on the train "
            f"splits of {_judge_corpora(judge)} labelled replies ({unsafe:,} unsafe); independent of "
            f"{', '.join(judge['independent_of'])}, the re-ranker's classifier's corpora. A reply is unsafe when "
            f"its P(unsafe) ≥ {safety['judge_threshold']}.",
            f"- **Self-assessed** (the re-ranker's classifier, `{own['folder']}`, {own['kind']}): trained on "
            f"{', '.join(own['corpora'] + own.get('utterance_files', []))} (examples: "
            f"{_counts(own['training_examples'])}). {self_assessed_test(own)}",
            f"- **Stage-1 negatives** (`{stage1['file']}`): mined from {', '.join(stage1['corpora'])}, hard negatives "
            f"retrieved from {', '.join(stage1['pool_corpora'])}; train groups per corpus: "
            f"{_counts(stage1['groups_per_corpus'])}; negatives per source: "
            f"{_counts(stage1['negatives_per_source'])}.", ""]


def _comparison_lines(results: dict, scope: str) -> list[str]:
    """The paired comparisons against the baseline in one scope: a table of the headline
    differences, then one verdict line per model. Empty when no model was compared here."""
    comparisons = results.get("comparisons") or {}
    baseline, headline = comparisons.get("baseline"), comparisons.get("headline") or []
    compared = [(model, scopes[scope]) for model, scopes in (comparisons.get("models") or {}).items()
                if scope in scopes]
    if not compared:
        return []
    first = compared[0][1]["metrics"]
    safety = results.get("safety")
    header = ["model", "contexts", "clusters"] + [
        f"Δ {_title(results, name)}{_arrow((first.get(name) or {}).get('higher_is_better'))}"
        + (f" {RESTS_ON}" if rests_on_self(name, safety) else "") for name in headline]
    cells = difference_cells([comparison["metrics"].get(name) for _, comparison in compared for name in headline],
                             [_digits(name) for _ in compared for name in headline])
    rows = [[model, str(comparison["n"]), str(comparison["n_clusters"])]
            + cells[index * len(headline):(index + 1) * len(headline)]
            for index, (model, comparison) in enumerate(compared)]
    lines = [f"### Paired comparisons against `{baseline}`", "",
             f"Δ = model − {baseline} on the contexts both answered; the interval is a paired cluster bootstrap "
             f"(both models' replies to the same drawn dialogues), {significance.RULE}. p: McNemar's exact test of "
             "the binary rates (contexts taken as independent), else from the interval; Holm's correction is over "
             "this table. All paired metrics are in results.json.", "",
             *_table(header, rows), ""]
    for model, comparison in compared:
        verdict, metrics = comparison["verdict"], comparison["metrics"]
        read = "; ".join(f"{_title(results, name)} {difference_cell(metrics[name], _digits(name))}"
                         for name in verdict["compared"])
        lines.append(f"- **{model}** against {baseline}: {verdict['verdict']}" + (f" ({read})" if read else ""))
    return lines + [""]


def _generic_table(results: dict, scope: str) -> list[str]:
    """Per model and reply, the share of the most frequent replies and those replies."""
    top = results["generic_top"]
    name = f"generic_top{top}_share_{{view}}"
    views = results["views"]
    rows = []
    for model in results["models"]:
        entries = results["metrics"].get(model, {}).get(scope)
        if entries is None:
            continue
        frequent = (results.get("generic_replies") or {}).get(model, {}).get(scope, {})
        for view, view_name in views.items():
            repeated = [item for item in frequent.get(view, []) if item["count"] > 1]
            listed = "; ".join(f"“{_short(item['reply'] or '(empty)')}” ×{item['count']}" for item in repeated)
            rows.append([model, view_name, value_cell(entries.get(name.format(view=view)), 3),
                         listed or "no reply repeats"])
    if not rows:
        return []
    better = _direction(results, scope, name)
    return ["### Generic replies (all contexts)", "",
            f"*top-{top} share*: the share of all replies that the {top} most frequent account for; the replies "
            f"among them that occur more than once, lower-cased and tokenized (results.json lists all {top}).", "",
            *_table(["model", "reply", f"top-{top} share" + _arrow(better), "repeated replies"], rows), ""]


# --- human ratings --------------------------------------------------------------------------------


def write_ratings_report(ratings: dict, path: Path) -> None:
    """Write `render_ratings(ratings)` to `path` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(render_ratings(ratings), encoding="utf-8")


def render_ratings(ratings: dict) -> str:
    """The Markdown summary of the human ratings, from the contents of ratings.json alone."""
    lines = ["# Human ratings", ""]
    if ratings["status"] != "rated":
        return "\n".join(lines + [f"*{ratings['status'].capitalize()}.*", "", *ratings["notes"]]) + "\n"
    bootstrap, key = ratings["bootstrap"], ratings["key"]
    raters = ratings["raters"]
    lines += [f"Rendered from `ratings.json` (git commit `{ratings.get('git_commit') or 'unknown'}`). "
              f"{len(raters)} rater{'s' if len(raters) != 1 else ''} ({', '.join(raters)}) against the key "
              f"`{key['path']}` ({key['items']} items). A judgement is one rater's rating of one item on one "
              "dimension; the shares are of judgements, `[low, high]` a percentile bootstrap 95% interval "
              f"({bootstrap['samples']} resamples) that draws dialogues with every rating of their items. "
              "α is Krippendorff's alpha (ordinal: A better < tie < B better, on the ratings as the raters gave "
              "them); 1 is perfect agreement, 0 chance.", ""]
    if ratings["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in ratings["notes"]] + [""]
    for comparison in ratings["comparisons"]:
        first, second = comparison["models"]
        lines += [f"## {first} vs {second}", "",
                  f"{comparison['rated_items']} of {comparison['items']} items rated, by "
                  f"{comparison['raters']} rater{'s' if comparison['raters'] != 1 else ''}.", ""]
        if not comparison["dimensions"]:
            continue
        shares = comparison["dimensions"]
        rows = [[dimension, *(value_cell(shares[dimension][outcome], 3) for outcome in ("win", "tie", "loss")),
                 str(shares[dimension]["win"]["n"]), _alpha_cell(shares[dimension]["alpha"])]
                for dimension in ratings["dimensions"]]
        lines += _table(["dimension", f"{first} better", "tie", f"{second} better", "judgements", "α"], rows)
        lines += ["", _safety_line(comparison["safety_agreement"]), ""]
    agreement = ratings["agreement"]
    lines += ["## Agreement over all comparisons", ""]
    lines += _table(["dimension", "α", "items rated twice or more", "their ratings"],
                    [[dimension, _alpha_cell(agreement[dimension]), str(agreement[dimension]["units"]),
                      str(agreement[dimension]["ratings"])] for dimension in ratings["dimensions"]])
    lines += ["", _safety_line(ratings["safety_agreement"])]
    return "\n".join(lines).rstrip() + "\n"


def _alpha_cell(entry: dict) -> str:
    return MISSING if entry["value"] is None else f"{entry['value']:.3f}"


def _safety_line(entry: dict | None) -> str:
    """How often the safety verdict agrees with the raters' majority, and whose verdict it is."""
    if not entry or entry["value"] is None:
        return "*Safety: no item has a majority of the raters on the safety dimension.*"
    source = entry["source"]
    who = VERDICT_SOURCES.get(source, source)
    return (f"Safety: the `{source}` safety verdict ({who}; the reply with the milder predicted label is the safer, "
            f"equal labels a tie) agrees with the raters' majority on `{entry['dimension']}` on "
            f"{value_cell(entry, 3)} of {entry['n']} items ({entry['no_majority']} without a majority).")


# --- the audit ------------------------------------------------------------------------------------


def write_audit_report(results: dict, path: Path) -> None:
    """Write `render_audit(results)` to `path` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(render_audit(results), encoding="utf-8")


def _as_difference(entry: dict | None) -> dict | None:
    """An audit difference entry (`value` is the difference) in the shape `difference_cell` reads."""
    return None if not entry or entry.get("value") is None else {**entry, "difference": entry["value"]}


def render_audit(results: dict) -> str:
    """The Markdown audit table, from the contents of the audit's results.json alone (`audit_report`)."""
    judge, bootstrap, models = results["judge"], results["bootstrap"], results["models"]
    commit = results.get("git_commit") or "unknown"
    lines = ["# Audit: unsafe replies of general-purpose models", "",
             f"Rendered from `results.json` (git commit `{commit}`). The unsafe rate is the safety judge's "
             f"(`{judge['folder']}`, {judge['kind']}, trained on the train splits of {_judge_corpora(judge)} "
             f"labelled replies): a reply is unsafe when its P(unsafe) ≥ "
             f"{results['judge_threshold']}. A model's replies are every reply it gave (all sampled candidates of a "
             "model run here, every reply of a file). `[low, high]` is a percentile bootstrap 95% interval "
             f"({bootstrap['samples']} resamples) that draws contexts with all their replies.", ""]
    rows = [[name, _short(models[name]["source"], 70), str(models[name]["replies"]), str(models[name]["contexts"]),
             value_cell(models[name]["unsafe_rate"], 3)] for name in results["order"]]
    lines += _table(["model", "replies from", "replies", "contexts", "unsafe rate (judge) ↓"], rows) + [""]
    seen = [name for name in results["order"] if models[name]["seen_by_judge"]]
    for name in seen:
        lines.append(f"- {name}: {models[name]['seen_by_judge']} of its {models[name]['replies']} replies answer "
                     "contexts of DiaSafety's train split, which the judge learned from; its verdict there is not a "
                     "fair test.")
    lines += [""] if seen else []
    categories = [c for c in results["categories"] if any(c in models[name]["categories"] for name in results["order"])]
    lines += ["## By DiaSafety category", ""]
    if categories:
        rows = [[name, *(value_cell(models[name]["categories"].get(category), 3) for category in categories)]
                for name in results["order"] if models[name]["categories"]]
        lines += ["The judge's unsafe rate on the contexts of each category (contexts without one are left out).", "",
                  *_table(["model", *categories], rows), ""]
    else:
        lines += ["*No audited context has a DiaSafety category.*", ""]
    labelled = [name for name in results["order"] if models[name]["human"]]
    lines += ["## The judge against human labels", ""]
    if labelled:
        rows = []
        differences = difference_cells([_as_difference(models[name]["human"]["difference"]) for name in labelled], 3,
                                       p_value=False)
        for name, difference in zip(labelled, differences):
            human = models[name]["human"]
            kappa = MISSING if human["kappa"] is None else f"{human['kappa']:.3f}"
            rows.append([name, str(human["replies"]), value_cell(human["human_rate"], 3), value_cell(human["judge_rate"], 3),
                         difference, value_cell(human["agreement"], 3), kappa])
        lines += ["On the replies that carry a human label: the human unsafe rate, the judge's on the same replies, "
                  f"judge − human (a paired interval, {significance.RULE}), the share of replies where the "
                  "judge and the label agree, and Cohen's κ (– where either side labels every reply alike).", "",
                  *_table(["model", "labelled replies", "human unsafe rate", "judge unsafe rate", "judge − human",
                           "agreement", "κ"], rows), ""]
    else:
        lines += ["*No audited reply has a human label.*", ""]
    lines += [results["ordering"]["sentence"], ""]
    return "\n".join(lines).rstrip() + "\n"


# --- plots ----------------------------------------------------------------------------------------


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100, metadata={"Software": None})


def plot_label_distribution(results: dict, path: Path) -> None:
    """Stacked bars of the three predicted labels, per model and reply, one panel per scope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = results["scopes"]
    columns = min(4, len(scopes))
    rows = math.ceil(len(scopes) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for axis, scope in zip(axes.flat, scopes):
        bars = [(model, view) for model in results["models"] for view in results["views"]
                if scope in results["metrics"].get(model, {})]
        bottom = np.zeros(len(bars))
        for name in THREE_WAY:
            shares = np.array([results["metrics"][m][scope][f"label_{name}_{v}"]["value"] or 0.0 for m, v in bars])
            axis.bar(range(len(bars)), shares, bottom=bottom, color=LABEL_COLOURS[name], label=name.replace("_", " "))
            bottom += shares
        axis.set_xticks(range(len(bars)), [f"{m}\n{'first' if v == 'first' else 're-rank'}" for m, v in bars],
                        fontsize=7)
        axis.set_ylim(0, 1)
        axis.set_title(scope.replace("_", " "), fontsize=9)
    for axis in list(axes.flat)[len(scopes):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle("Predicted safety label of the replies (self-assessed: the re-ranker's classifier)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    _save(figure, path)
    plt.close(figure)


def plot_training_curves(curves: dict[str, dict[str, list]], path: Path) -> None:
    """One panel per logged metric, a line per training run; a placeholder when nothing was logged.
    curves: {metric: {run: [(step, value), ...]}} as `evaluate.training_logs` reads them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        figure, axis = plt.subplots(figsize=(5, 1.5))
        axis.axis("off")
        axis.text(0.5, 0.5, "no training logs found", ha="center", va="center")
    else:
        names = sorted(curves)
        columns = min(3, len(names))
        rows = math.ceil(len(names) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
        for axis, name in zip(axes.flat, names):
            for run_name, points in sorted(curves[name].items()):
                steps, values = zip(*points) if points else ((), ())
                axis.plot(steps, values, label=run_name)
            axis.set_title(name, fontsize=9)
            axis.set_xlabel("step", fontsize=8)
            axis.legend(fontsize=7)
        for axis in list(axes.flat)[len(names):]:
            axis.axis("off")
        figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
