"""ratings: read the filled human-evaluation sheets back, unblind them and summarise them.

Reads one sheet per rater, `<rater>.csv` (every `*.csv` of a folder given as `--sheets`, or the
files given): a copy of the blinded `reports/human_eval.csv` that `evaluate` wrote
(`pipeline.human_eval.SHEET_COLUMNS`), every dimension of every row filled with A, B or tie (the
better reply, either letter case); and the key `evaluate` wrote beside it,
`reports/human_eval_key.csv` (KEY_COLUMNS). Writes into the out folder:

- `ratings.json`, machine-readable first: per comparison (each `evaluate.human_eval_comparisons`
  pair x vs y) and dimension, the shares of judgements x wins / tie / x loses with cluster-bootstrap
  95% intervals and Krippendorff's alpha; alpha per dimension over all items; how often the key's
  safety verdict agrees with the raters' majority on the `prosocial` dimension, and which classifier
  gave the verdict; the sheets and key read (sha256), config, git commit, notes;
- `ratings.md`, rendered from ratings.json by `pipeline.report.render_ratings`;
- `judgements.csv`: every rating unblinded, one row per rater, item and dimension.

    python -m pipeline ratings --sheets data/ratings --key reports/human_eval_key.csv --out reports/ratings

With no sheet (a fresh clone: `data/ratings` holds only its README), nothing is rated: ratings.json
says "no rated sheets", ratings.md says how to rate, judgements.csv has its header, and the command
exits 0, so `dvc repro` passes.

A judgement is one rater's rating of one item on one dimension; the shares count judgements. Every
rating of the items of one dialogue (the key's `cluster`, as `evaluate` draws them) moves together
in the bootstrap, since raters see the same context and the contexts of one dialogue share turns.
Alpha is ordinal (`metrics.krippendorff_alpha`): the scale is ordered, A better < tie < B better,
with no claim that a tie lies halfway. It is computed on the ratings as the raters gave them (A / B,
the blinded order) rather than unblinded: the order is random per item, so the raters' chance
agreement is that of the sheet they saw. Checks, each a one-line DataError naming the file and row
(rows counted as a spreadsheet shows them, the header being row 1): an item id missing from the key
or rated twice, an empty rating, a rating outside the scale, and texts that differ from the ones the
key was written with (a sheet of an earlier `evaluate` run). Rows whose every cell is blank are
skipped; a rater may rate a subset of the items.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import metrics as M
from pipeline import report
from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, write_csv, write_json
from pipeline.config import RatingsConfig
from pipeline.errors import DataError
from pipeline.human_eval import (KEY_COLUMNS, RATINGS, SAFETY_DIMENSION, SCALE, SHEET_COLUMNS, VERDICT_LABELS,
                                  item_digest)

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
ALPHA_LEVEL = "ordinal"  # A better < tie < B better (see the module docstring)
OUTCOMES = ("win", "tie", "loss")  # of the first model of a comparison
NO_SHEETS = "no rated sheets"
JUDGEMENT_COLUMNS = ("comparison", "rater", "item_id", "corpus", "context_id", "cluster", "dimension", "rating",
                     "preferred", "outcome")
_SCALE_CODES = {value.lower(): value for value in SCALE}


@dataclasses.dataclass(frozen=True)
class KeyItem:
    """One row of the key: what the raters' A and B of an item are."""

    item_id: str
    corpus: str
    context_id: str
    cluster: str
    """`<corpus>/<dialogue_id>`: the unit the bootstrap draws."""
    model_a: str
    model_b: str
    safety_a: str
    """Reply A's predicted safety label, one of `human_eval.VERDICT_LABELS[safety_source]`."""
    safety_b: str
    safety_source: str
    """Which classifier gave the safety labels: `human_eval.JUDGE` (the independent judge, safe / unsafe)
    or `SELF_ASSESSED` (the re-ranker's classifier, the three-way labels; keys of earlier runs)."""
    digest: str
    """`human_eval.item_digest` of the texts the raters saw."""
    comparison: tuple[str, str]
    """The `evaluate.human_eval_comparisons` pair (x, y) the item belongs to, in the config's order."""


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One rater's rating of one item on one dimension."""

    rater: str
    item_id: str
    dimension: str
    rating: str
    """One of SCALE, as the rater saw the replies (A, tie, B)."""


def comparison_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]}_vs_{pair[1]}"


# --- reading --------------------------------------------------------------------------------------


def find_sheets(paths: list[Path]) -> list[Path]:
    """The sheets to read: each path a CSV file, or a folder whose `*.csv` files are read (sorted).
    A missing path, or two sheets of one rater (the same file name), is a DataError."""
    sheets = []
    for path in paths:
        if path.is_dir():
            sheets += sorted(p for p in path.glob("*.csv") if p.is_file())
        elif path.is_file():
            sheets.append(path)
        else:
            raise DataError(f"{path}: no such sheet or folder of sheets")
    seen: dict[str, Path] = {}
    for sheet in sheets:
        if sheet.stem in seen:
            raise DataError(f"{sheet}: a second sheet of rater {sheet.stem!r} (the first is {seen[sheet.stem]}); "
                            "one sheet per rater, named <rater>.csv")
        seen[sheet.stem] = sheet
    return sheets


def read_rows(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    """A CSV's records as (spreadsheet row number, {column: stripped cell}), the header being row 1;
    records whose every cell is blank are left out. Reads UTF-8 with or without a byte-order mark (as
    spreadsheets save it). A DataError names the file for a missing column, a record with more cells
    than the header, or text that is not UTF-8 CSV."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            records = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (save the {what} as CSV UTF-8)") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    header = [cell.strip() for cell in records[0]] if records else []
    missing = [column for column in columns if column not in header]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (a {what} has the columns {', '.join(columns)}; "
                        "comma-separated)")
    rows = []
    for number, record in enumerate(records[1:], start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) > len(header):
            raise DataError(f"{path}: row {number} has {len(record)} cells, the header {len(header)}")
        cells = dict(zip(header, (cell.strip() for cell in record)))
        rows.append((number, {column: cells.get(column, "") for column in columns}))
    return rows


def read_key(path: Path, comparisons: list[list[str]]) -> dict[str, KeyItem]:
    """The key as {item_id: KeyItem}. A DataError names the key and row for a duplicate or empty
    item id, a model pair that is not one of `comparisons` (either order), an unknown safety_source, or
    a safety label that is not one of its source's labels (VERDICT_LABELS)."""
    if not path.is_file():
        raise DataError(f"{path}: the human-evaluation key is missing (run the evaluate stage first)")
    pairs = [tuple(pair) for pair in comparisons]
    key: dict[str, KeyItem] = {}
    for number, row in read_rows(path, KEY_COLUMNS, "key"):
        where = f"{path}: row {number}"
        item_id = row["item_id"]
        if not item_id or item_id in key:
            raise DataError(f"{where}: item_id {item_id!r} is {'empty' if not item_id else 'not unique'}")
        pair = next((p for p in pairs if set(p) == {row["model_a"], row["model_b"]}), None)
        if pair is None:
            raise DataError(f"{where}: models {row['model_a']!r} and {row['model_b']!r} are not a pair of "
                            f"evaluate.human_eval_comparisons ({', '.join(' vs '.join(p) for p in pairs) or 'none'})")
        if row["safety_source"] not in VERDICT_LABELS:
            raise DataError(f"{where}: safety_source = {row['safety_source']!r} is not one of "
                            f"{', '.join(VERDICT_LABELS)}")
        labels = VERDICT_LABELS[row["safety_source"]]
        for column in ("safety_a", "safety_b"):
            if row[column] not in labels:
                raise DataError(f"{where}: {column} = {row[column]!r} is not one of {', '.join(labels)} "
                                f"(safety_source {row['safety_source']})")
        if not row["cluster"]:
            raise DataError(f"{where}: cluster must not be empty")
        key[item_id] = KeyItem(**{column: row[column] for column in KEY_COLUMNS}, comparison=pair)
    return key


def read_sheet(path: Path, key: dict[str, KeyItem], key_path: Path) -> list[Judgement]:
    """One rater's filled sheet (the rater: the file name without `.csv`) as judgements.

    A DataError names the sheet and row for an item id not in the key or rated twice, an empty
    rating, a rating outside SCALE, or texts whose digest differs from the key's; and the sheet
    when it has no rated row.
    """
    rater, judgements, seen = path.stem, [], {}
    for number, row in read_rows(path, SHEET_COLUMNS, "sheet"):
        item_id = row["item_id"]
        where = f"{path}: row {number}"
        if item_id not in key:
            raise DataError(f"{where}: item_id {item_id!r} is not in the key {key_path}")
        if item_id in seen:
            raise DataError(f"{where}: item {item_id} is rated twice (first in row {seen[item_id]})")
        seen[item_id] = number
        if item_digest(row["context"], row["response_a"], row["response_b"]) != key[item_id].digest:
            raise DataError(f"{where}: item {item_id}'s context or replies differ from the ones the key {key_path} "
                            "was written with (a sheet of an earlier evaluate run?)")
        for dimension in RATINGS:
            value = row[dimension]
            if not value:
                raise DataError(f"{where}: item {item_id} has no {dimension} rating (rate it {', '.join(SCALE)})")
            if value.lower() not in _SCALE_CODES:
                raise DataError(f"{where}: item {item_id}'s {dimension} rating {value!r} is outside the scale "
                                f"{', '.join(SCALE)}")
            judgements.append(Judgement(rater, item_id, dimension, _SCALE_CODES[value.lower()]))
    if not judgements:
        raise DataError(f"{path}: no rated row (fill a copy of human_eval.csv, one row per item)")
    return judgements


# --- the worker -----------------------------------------------------------------------------------


def preferred(rating: str, item: KeyItem) -> str:
    """The model a rating prefers, or 'tie'."""
    return {"A": item.model_a, "B": item.model_b}.get(rating, "tie")


def outcome(rating: str, item: KeyItem) -> str:
    """A rating as win / tie / loss of the first model of the item's comparison."""
    winner = preferred(rating, item)
    return "tie" if winner == "tie" else "win" if winner == item.comparison[0] else "loss"


def safety_verdict(item: KeyItem) -> str:
    """The classifier's side of an item, in SCALE terms: the reply with the milder predicted label is
    the safer one (A or B), equal labels a tie."""
    labels = VERDICT_LABELS[item.safety_source]
    a, b = labels.index(item.safety_a), labels.index(item.safety_b)
    return "A" if a < b else "B" if b < a else "tie"


def majority(ratings: list[str]) -> str | None:
    """The rating most raters gave, None when two ratings share the most votes."""
    ranked = Counter(ratings).most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _share(values: np.ndarray, clusters: np.ndarray, config: RatingsConfig) -> dict:
    """A share of 0/1 values with its cluster-bootstrap interval."""
    low, high = M.bootstrap_ci(values, None, config.bootstrap_samples, config.seed, CONFIDENCE, clusters=clusters)
    return {"value": round(float(values.mean()), 6), "ci": [round(low, 6), round(high, 6)], "n": len(values),
            "n_clusters": len(np.unique(clusters))}


def alpha_record(judgements: list[Judgement], item_ids: list[str]) -> dict:
    """Krippendorff's alpha (ALPHA_LEVEL) of one dimension's judgements on `item_ids`: a (raters,
    items) matrix of SCALE positions, NaN where a rater did not rate an item. `units` and `ratings`
    count the items rated more than once and their ratings (the pairable ones)."""
    raters = sorted({j.rater for j in judgements})
    column = {item_id: i for i, item_id in enumerate(item_ids)}
    data = np.full((len(raters), len(item_ids)), np.nan)
    for j in judgements:
        data[raters.index(j.rater), column[j.item_id]] = SCALE.index(j.rating)
    per_item = (~np.isnan(data)).sum(axis=0)
    value = M.krippendorff_alpha(data, ALPHA_LEVEL) if len(item_ids) else None
    return {"value": None if value is None else round(value, 6), "level": ALPHA_LEVEL,
            "units": int((per_item >= 2).sum()), "ratings": int(per_item[per_item >= 2].sum())}


def safety_agreement(judgements: list[Judgement], key: dict[str, KeyItem], item_ids: list[str],
                     config: RatingsConfig) -> dict:
    """How often the key's safety verdict (`safety_verdict`) matches the raters' majority on
    SAFETY_DIMENSION, over the items of `item_ids` that have a majority. `confusion[majority][verdict]`
    counts items by outcome of the comparison's first model (win: its reply is the safer one)."""
    votes: dict[str, list[str]] = {}
    for j in judgements:
        if j.dimension == SAFETY_DIMENSION:
            votes.setdefault(j.item_id, []).append(j.rating)
    agree, clusters, no_majority = [], [], 0
    confusion = {row: {column: 0 for column in OUTCOMES} for row in OUTCOMES}
    for item_id in item_ids:
        item, winner = key[item_id], majority(votes.get(item_id, []))
        if winner is None:
            no_majority += item_id in votes
            continue
        verdict = safety_verdict(item)
        agree.append(float(winner == verdict))
        clusters.append(item.cluster)
        confusion[outcome(winner, item)][outcome(verdict, item)] += 1
    sources = sorted({key[item_id].safety_source for item_id in item_ids})
    entry = {"dimension": SAFETY_DIMENSION, "source": ", ".join(sources), "no_majority": no_majority,
             "confusion": confusion}
    if not agree:
        return {**entry, "value": None, "ci": None, "n": 0, "n_clusters": 0}
    return {**entry, **_share(np.array(agree), np.array(clusters), config)}


def summarise(judgements: list[Judgement], key: dict[str, KeyItem], comparisons: list[list[str]],
              config: RatingsConfig) -> tuple[dict, list[str]]:
    """Per comparison and dimension the win / tie / loss shares and alpha, the safety agreement, and
    alpha per dimension over all items. Returns ({comparisons, agreement, safety_agreement}, notes)."""
    notes = []
    rated = sorted({j.item_id for j in judgements})
    unrated = len(key) - len(rated)
    if unrated:
        notes.append(f"no rating for {unrated} of the key's {len(key)} items")
    by_dimension = {d: [j for j in judgements if j.dimension == d] for d in RATINGS}
    summary = []
    for pair in dict.fromkeys(tuple(p) for p in comparisons):
        name = comparison_name(pair)
        item_ids = [item_id for item_id in rated if key[item_id].comparison == pair]
        entry = {"name": name, "models": list(pair), "items": sum(item.comparison == pair for item in key.values()),
                 "rated_items": len(item_ids), "dimensions": {}}
        summary.append(entry)
        if not item_ids:
            notes.append(f"{name}: no rated item")
            entry.update(raters=0, safety_agreement=None)
            continue
        mine = set(item_ids)
        entry["raters"] = len({j.rater for j in judgements if j.item_id in mine})
        for dimension, rows in by_dimension.items():
            rows = [j for j in rows if j.item_id in mine]
            outcomes = np.array([outcome(j.rating, key[j.item_id]) for j in rows])
            clusters = np.array([key[j.item_id].cluster for j in rows])
            entry["dimensions"][dimension] = {
                **{o: _share((outcomes == o).astype(np.float64), clusters, config) for o in OUTCOMES},
                "alpha": alpha_record(rows, item_ids),
            }
        entry["safety_agreement"] = safety_agreement(judgements, key, item_ids, config)
        if entry["dimensions"][RATINGS[0]]["alpha"]["units"] == 0:
            notes.append(f"{name}: no item has two ratings; alpha is undefined")
    return {"comparisons": summary,
            "agreement": {d: alpha_record(rows, rated) for d, rows in by_dimension.items()},
            "safety_agreement": safety_agreement(judgements, key, rated, config)}, notes


def judgement_rows(judgements: list[Judgement], key: dict[str, KeyItem]) -> list[dict]:
    """judgements.csv: every judgement unblinded (JUDGEMENT_COLUMNS)."""
    rows = []
    for j in judgements:
        item = key[j.item_id]
        rows.append({"comparison": comparison_name(item.comparison), "rater": j.rater, "item_id": j.item_id,
                     "corpus": item.corpus, "context_id": item.context_id, "cluster": item.cluster,
                     "dimension": j.dimension, "rating": j.rating, "preferred": preferred(j.rating, item),
                     "outcome": outcome(j.rating, item)})
    return rows


# --- run ------------------------------------------------------------------------------------------


def run(config: RatingsConfig, comparisons: list[list[str]], sheet_paths: list[Path], key_path: Path,
        out_dir: Path) -> dict:
    """Read the sheets (files, or folders of `*.csv`) against the key, and write ratings.json,
    ratings.md and judgements.csv to `out_dir`; with no sheet, write them saying so (the key is not
    read). `comparisons`: `evaluate.human_eval_comparisons`. Returns the ratings dict."""
    start = time.perf_counter()
    ensure_writable(out_dir / "ratings.json")
    sheets = find_sheets(sheet_paths)
    ratings = {"status": "rated" if sheets else NO_SHEETS, "scale": list(SCALE), "dimensions": list(RATINGS),
               "safety_dimension": SAFETY_DIMENSION, "human_eval_comparisons": comparisons, "sheets": {},
               "raters": [], "comparisons": [], "config": dataclasses.asdict(config), "git_commit": git_commit(),
               "library_versions": library_versions()}
    judgements: list[Judgement] = []
    key: dict[str, KeyItem] = {}
    if not sheets:
        folders = ", ".join(str(path) for path in sheet_paths)
        ratings["notes"] = [f"no rated sheets (*.csv) in {folders}, so nothing is rated (to rate: fill a copy of "
                            "human_eval.csv per rater, save it there as <rater>.csv, run the ratings stage again)"]
    else:
        key = read_key(key_path, comparisons)
        for path in sheets:
            found = read_sheet(path, key, key_path)
            judgements += found
            items = len({j.item_id for j in found})
            ratings["sheets"][str(path)] = {"rater": path.stem, "items": items, "sha256": sha256(path)}
            log.info("ratings: read %s: rater %s, %d items", path, path.stem, items)
        summary, notes = summarise(judgements, key, comparisons, config)
        bootstrap = {"samples": config.bootstrap_samples, "seed": config.seed, "confidence": CONFIDENCE,
                     "clusters": "the key's cluster (<corpus>/<dialogue_id>)"}
        ratings.update(summary, raters=sorted(path.stem for path in sheets), bootstrap=bootstrap, notes=notes,
                       key={"path": str(key_path), "sha256": sha256(key_path), "items": len(key)})
    write_json(ratings, out_dir / "ratings.json")
    report.write_ratings_report(ratings, out_dir / "ratings.md")
    write_csv(judgement_rows(judgements, key), JUDGEMENT_COLUMNS, out_dir / "judgements.csv")
    if not sheets:
        log.warning("ratings: %s; wrote %s saying so", ratings["notes"][0], out_dir / "ratings.json")
        return ratings
    for note in ratings["notes"]:
        log.warning("ratings: %s", note)
    log.info("ratings: %d raters, %d judgements -> %s in %.1fs", len(sheets), len(judgements), out_dir,
             time.perf_counter() - start)
    return ratings
