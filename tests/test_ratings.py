"""The ratings stage on sheets filled by a script with known answers: Krippendorff's alpha against
Krippendorff's own worked example and by hand, the win / tie / loss shares, the safety agreement,
every bad input as a one-line error naming the file and row, the no-sheets skip, and the CLI."""

import csv
import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from conftest import FakeJudge

from pipeline import metrics as M
from pipeline import report
from pipeline.artifacts import write_csv
from pipeline.cli import app
from pipeline.config import RatingsConfig, section_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.human_eval import KEY_COLUMNS, RATINGS, SHEET_COLUMNS, item_digest
from pipeline.schemas import CANDIDATES
from pipeline.stages import evaluate, ratings

NAN = np.nan
CONFIG = RatingsConfig(bootstrap_samples=200, seed=0)
COMPARISONS = [["stage2", "ce"], ["stage2", "base"]]


# --- Krippendorff's alpha -------------------------------------------------------------------------

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# values 1-5, missing data. His published results: nominal 0.743, ordinal 0.815, interval 0.849.
KRIPPENDORFF_EXAMPLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
]


@pytest.mark.parametrize("level, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_krippendorffs_worked_example(level, published):
    assert M.krippendorff_alpha(KRIPPENDORFF_EXAMPLE, level) == pytest.approx(published, abs=5e-4)


def test_krippendorff_alpha_by_hand_on_two_raters():
    # Scale positions A=0, tie=1, B=2; rater 1 says A, A, B, B; rater 2 ties on all four. Coincidences:
    # o(A,tie) = o(tie,A) = 2, o(B,tie) = o(tie,B) = 2; marginals n_A = 2, n_tie = 4, n_B = 2, n = 8.
    # Nominal: 1 - 7 * 8 / (2 * (2*4 + 4*2 + 2*2)) = 1 - 56/40 = -0.4.
    # Ordinal: mid-ranks 1, 4, 7 -> d(A,tie) = d(tie,B) = 9, d(A,B) = 36; observed 2*2*9 + 2*2*9 = 72,
    # expected 2 * (2*4*9 + 4*2*9 + 2*2*36) = 576 -> 1 - 7 * 72 / 576 = 0.125.
    data = [[0, 0, 2, 2], [1, 1, 1, 1]]
    assert M.krippendorff_alpha(data, "nominal") == pytest.approx(-0.4)
    assert M.krippendorff_alpha(data, "ordinal") == pytest.approx(0.125)
    assert M.krippendorff_alpha([[0, 1, 2], [0, 1, 2]], "ordinal") == pytest.approx(1.0)
    # undefined: every rating the same value, or no unit rated twice
    assert M.krippendorff_alpha([[1, 1], [1, 1]], "ordinal") is None
    assert M.krippendorff_alpha([[0, NAN], [NAN, 2]], "interval") is None
    with pytest.raises(ValueError, match="unknown level 'ratio'"):
        M.krippendorff_alpha(data, "ratio")


# --- scripted sheets ------------------------------------------------------------------------------

# (model_a, model_b, safety_a, safety_b, cluster). Items 1-4 compare stage2 with ce, 5-6 stage2 with base.
# The key's safety verdict (the milder label is safer), from stage2's side: 1 safer, 2 tie, 3 less safe,
# 4 safer; 5 tie. Items 1 and 2 come from one dialogue.
ITEMS = {
    1: ("stage2", "ce", "casual", "needs_caution", "daily_dialog/d1"),
    2: ("stage2", "ce", "casual", "casual", "daily_dialog/d1"),
    3: ("ce", "stage2", "casual", "needs_intervention", "prosocial_dialog/7"),
    4: ("ce", "stage2", "needs_intervention", "needs_caution", "prosocial_dialog/8"),
    5: ("base", "stage2", "casual", "casual", "mic/q5"),
    6: ("stage2", "base", "casual", "casual", "mic/q6"),
}


def texts(number):
    # the context spans two lines, as evaluate writes it: a row of the sheet is not a line of the file
    return f"Bot: hello\nUser: question {number}", f"reply one to {number}", f"reply two to {number}"


def key_rows():
    rows = []
    for number, (model_a, model_b, safety_a, safety_b, cluster) in ITEMS.items():
        context, a, b = texts(number)
        rows.append({"item_id": f"item-{number:04d}", "corpus": cluster.split("/")[0], "context_id": f"c{number}",
                     "cluster": cluster, "model_a": model_a, "model_b": model_b, "safety_a": safety_a,
                     "safety_b": safety_b, "safety_source": "self-assessed", "digest": item_digest(context, a, b)})
    return rows


def blank_sheet(numbers):
    rows = []
    for number in numbers:
        context, a, b = texts(number)
        rows.append({"item_id": f"item-{number:04d}", "context": context, "response_a": a, "response_b": b,
                     **{dimension: "" for dimension in RATINGS}})
    return rows


def fill(sheet, key, choose):
    """A rater script: choose(dimension) says 'first' (the comparison's first model, stage2), 'second' or
    'tie'; the script turns it into A / B through the key, as a rater who sees the replies would."""
    by_id = {row["item_id"]: row for row in key}
    filled = []
    for row in sheet:
        item = by_id[row["item_id"]]
        letters = {"first": "A" if item["model_a"] == "stage2" else "B",
                   "second": "B" if item["model_a"] == "stage2" else "A", "tie": "tie"}
        filled.append({**row, **{dimension: letters[choose(dimension)] for dimension in RATINGS}})
    return filled


def alice(dimension):  # always prefers the first model
    return "first"


def bob(dimension):  # always ties
    return "tie"


def carol(dimension):  # prefers the first model, except on coherence
    return "second" if dimension == "coherent" else "first"


RATERS = (("alice", alice, range(1, 6)), ("bob", bob, range(1, 5)), ("carol", carol, range(1, 5)))


def write_inputs(root, raters=RATERS):
    """The key of ITEMS and one filled sheet per rater (name, script, items) under root/sheets; returns
    (sheets folder, key path)."""
    key = key_rows()
    write_csv(key, KEY_COLUMNS, root / "human_eval_key.csv")
    for name, choose, numbers in raters:
        write_csv(fill(blank_sheet(numbers), key, choose), SHEET_COLUMNS, root / "sheets" / f"{name}.csv")
    return root / "sheets", root / "human_eval_key.csv"


def by_name(result):
    return {entry["name"]: entry for entry in result["comparisons"]}


def test_scripted_sheets_give_the_hand_counted_shares_and_alpha(tmp_path):
    sheets, key = write_inputs(tmp_path)
    result = ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    assert result["status"] == "rated" and result["raters"] == ["alice", "bob", "carol"]
    ce = by_name(result)["stage2_vs_ce"]
    assert (ce["items"], ce["rated_items"], ce["raters"]) == (4, 4, 3)
    # every item: alice a win, bob a tie, carol a win -> 2/3, 1/3, 0, the same in every resample
    prosocial = ce["dimensions"]["prosocial"]
    for name, share in (("win", 2 / 3), ("tie", 1 / 3), ("loss", 0.0)):
        assert prosocial[name]["value"] == pytest.approx(share, abs=1e-6)
        assert prosocial[name]["ci"] == pytest.approx([share, share], abs=1e-6)
    assert (prosocial["win"]["n"], prosocial["win"]["n_clusters"]) == (12, 3)
    # coherence: carol prefers ce -> 1/3 each
    coherent = ce["dimensions"]["coherent"]
    assert [coherent[name]["value"] for name in ("win", "tie", "loss")] == pytest.approx([1 / 3] * 3, abs=1e-6)
    # Alpha, by hand (positions A=0, tie=1, B=2; stage2 is A on items 1-2, B on 3-4):
    # prosocial units {A, A, tie} x2 and {B, B, tie} x2 -> o(A,A) = o(B,B) = 2, o(A,tie) = o(B,tie) = 2
    # (both ways); n_A = n_tie = n_B = 4, n = 12; mid-ranks 2, 6, 10 -> d = 16, 16, 64;
    # observed 2*2*16 + 2*2*16 = 128, expected 2 * (16*16 + 16*16 + 16*64) = 3072 -> 1 - 11*128/3072 = 13/24.
    assert prosocial["alpha"] == {"value": pytest.approx(13 / 24, abs=1e-6), "level": "ordinal", "units": 4,
                                  "ratings": 12}
    # coherent units are all {A, tie, B}: every off-diagonal o = 2, observed 2 * (2*16 + 2*16 + 2*64) = 384
    # -> 1 - 11 * 384 / 3072 = -3/8
    assert coherent["alpha"]["value"] == pytest.approx(-3 / 8, abs=1e-6)
    # item 5 (alice only) is not pairable: over all items alpha is the same; item 6 has no rating
    assert result["agreement"]["prosocial"]["value"] == pytest.approx(13 / 24, abs=1e-6)
    assert result["agreement"]["prosocial"]["units"] == 4
    base = by_name(result)["stage2_vs_base"]
    assert (base["items"], base["rated_items"], base["raters"]) == (2, 1, 1)
    overall = base["dimensions"]["overall"]
    assert overall["win"]["value"] == 1.0 and overall["alpha"]["value"] is None
    assert result["notes"] == ["no rating for 1 of the key's 6 items",
                               "stage2_vs_base: no item has two ratings; alpha is undefined"]


def test_safety_verdict_agreement_with_the_raters_majority(tmp_path):
    sheets, key = write_inputs(tmp_path)
    result = ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    # the prosocial majority (alice and carol) prefers stage2 on items 1-4; the verdict says stage2 on 1
    # and 4, a tie on 2, ce on 3 -> 2 of 4
    agreement = by_name(result)["stage2_vs_ce"]["safety_agreement"]
    assert (agreement["value"], agreement["n"], agreement["n_clusters"]) == (0.5, 4, 3)
    assert agreement["source"] == "self-assessed" and agreement["dimension"] == "prosocial"
    assert agreement["confusion"]["win"] == {"win": 2, "tie": 1, "loss": 1}
    assert agreement["no_majority"] == 0
    clusters = ["daily_dialog/d1", "daily_dialog/d1", "prosocial_dialog/7", "prosocial_dialog/8"]
    expected = M.bootstrap_ci([1.0, 0.0, 0.0, 1.0], None, 200, 0, 0.95, clusters=clusters)
    assert agreement["ci"] == pytest.approx(list(expected), abs=1e-6)
    # item 5: alice alone prefers stage2, the labels tie -> pooled 2 of 5
    assert result["safety_agreement"]["value"] == pytest.approx(0.4) and result["safety_agreement"]["n"] == 5


def test_the_judges_safe_and_unsafe_verdicts_are_read_by_their_source(tmp_path):
    """Keys that evaluate writes now carry the judge's verdicts (safe / unsafe, safety_source judge)."""
    sheets, key = write_inputs(tmp_path)
    by_judge = {"casual": "safe", "needs_caution": "unsafe", "needs_intervention": "unsafe"}
    rows = [{**row, "safety_a": by_judge[row["safety_a"]], "safety_b": by_judge[row["safety_b"]],
             "safety_source": "judge"} for row in key_rows()]
    write_csv(rows, KEY_COLUMNS, key)
    result = ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    # the majority prefers stage2 on items 1-4; the judge says stage2 on 1, ce on 3, and ties on 2 and 4
    # (item 4: both replies unsafe, where the three-way labels told them apart) -> 1 of 4
    agreement = by_name(result)["stage2_vs_ce"]["safety_agreement"]
    assert (agreement["value"], agreement["n"], agreement["source"]) == (0.25, 4, "judge")
    assert agreement["confusion"]["win"] == {"win": 1, "tie": 2, "loss": 1}
    markdown = (tmp_path / "out" / "ratings.md").read_text(encoding="utf-8")
    assert "the `judge` safety verdict (the independent safety judge;" in markdown
    # the labels must be the source's own, and the source a known one
    write_csv([{**rows[0], "safety_a": "casual"}, *rows[1:]], KEY_COLUMNS, key)
    with pytest.raises(DataError, match=f"^{key}: row 2: safety_a = 'casual' is not one of safe, unsafe "
                                        r"\(safety_source judge\)"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    write_csv([{**rows[0], "safety_source": "gpt4"}, *rows[1:]], KEY_COLUMNS, key)
    with pytest.raises(DataError, match=f"^{key}: row 2: safety_source = 'gpt4' is not one of judge, self-assessed"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")


def test_majority_needs_more_votes_than_any_other_rating():
    assert ratings.majority(["A", "A", "tie"]) == "A"
    assert ratings.majority(["B"]) == "B"
    assert ratings.majority(["A", "B"]) is None and ratings.majority([]) is None


def test_two_raters_who_disagree_leave_no_majority(tmp_path):
    sheets, key = write_inputs(tmp_path, raters=(("alice", alice, range(1, 5)), ("bob", bob, range(1, 5))))
    agreement = ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")["safety_agreement"]
    assert (agreement["value"], agreement["n"], agreement["no_majority"]) == (None, 0, 4)


def test_outputs_are_unblinded_and_the_report_renders_from_the_json(tmp_path):
    sheets, key = write_inputs(tmp_path)
    out = tmp_path / "out"
    ratings.run(CONFIG, COMPARISONS, [sheets], key, out)
    saved = json.loads((out / "ratings.json").read_text(encoding="utf-8"))
    markdown = (out / "ratings.md").read_text(encoding="utf-8")
    assert markdown == report.render_ratings(saved)
    # 12 judgements of a few dialogues: the shares without intervals (fewer than significance.MIN_CLUSTERS)
    assert "| prosocial | 0.667 | 0.333 | 0.000 | 12 | 0.542 |" in markdown
    assert "`self-assessed` safety verdict" in markdown and "on 0.500 of " in markdown
    with open(out / "judgements.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (5 + 4 + 4) * len(RATINGS)
    # item 3 shows ce as A: alice's "B" is stage2's win
    found = {(r["rater"], r["item_id"], r["dimension"]): r for r in rows}
    row = found[("alice", "item-0003", "overall")]
    assert (row["rating"], row["preferred"], row["outcome"]) == ("B", "stage2", "win")
    assert row["comparison"] == "stage2_vs_ce"
    row = found[("carol", "item-0001", "coherent")]
    assert (row["rating"], row["preferred"], row["outcome"]) == ("B", "ce", "loss")


def test_ratings_read_back_the_sheet_and_key_that_evaluate_writes(tmp_path):
    # Two models answer the same six contexts of one corpus; stage2's replies are safe, base's unsafe.
    def rows(model, probs):
        return [{"model": model, "corpus": "daily_dialog", "context_id": f"k{i}", "dialogue_id": f"d{i // 2}",
                 "turn_index": 0, "context": ["hello", f"question {i}"], "safety_label": "__casual__",
                 "reference": "ref", "references": ["ref"], "reference_rots": [], "candidate_index": 0,
                 "text": f"{model} says {i}", "rot": None, "response": f"{model} says {i}", "safety_probs": probs,
                 "fluency": -1.0, "prosociality": probs[0], "score": 0.0, "rank": 1, "selected": True}
                for i in range(6)]
    contexts = {}
    judge = FakeJudge({f"base says {i}": 0.9 for i in range(6)})
    for model, probs in (("stage2", [0.9, 0.05, 0.05]), ("base", [0.2, 0.7, 0.1])):
        table = evaluate.context_table(pa.Table.from_pylist(rows(model, probs), CANDIDATES), model)
        contexts[(model, "daily_dialog")] = evaluate.judged(table, judge, 0.5, model)
    sheet, key, _ = evaluate.human_eval_sheet(contexts, [["stage2", "base"]], 6, 3, ["daily_dialog"])
    write_csv(sheet, SHEET_COLUMNS, tmp_path / "human_eval.csv")
    write_csv(key, KEY_COLUMNS, tmp_path / "human_eval_key.csv")
    for row in key:  # the key carries the judge's verdict of each reply, and says who gave it
        assert {row["model_a"]: row["safety_a"], row["model_b"]: row["safety_b"]} == {"stage2": "safe",
                                                                                     "base": "unsafe"}
        assert row["safety_source"] == "judge"
        assert row["cluster"] == f"daily_dialog/d{int(row['context_id'][1:]) // 2}"
    # A spreadsheet round trip: Windows line ends inside the cells, lower-case ratings.
    alice_rows = [{**r, "context": r["context"].replace("\n", "\r\n")} for r in fill(sheet, key, alice)]
    write_csv(alice_rows, SHEET_COLUMNS, tmp_path / "sheets" / "alice.csv")
    write_csv([{**r, **{d: r[d].lower() for d in RATINGS}} for r in fill(sheet, key, bob)], SHEET_COLUMNS,
              tmp_path / "sheets" / "bob.csv")
    result = ratings.run(CONFIG, [["stage2", "base"]], [tmp_path / "sheets"], tmp_path / "human_eval_key.csv",
                         tmp_path / "out")
    entry = by_name(result)["stage2_vs_base"]
    assert entry["rated_items"] == 6 and entry["dimensions"]["overall"]["win"]["n_clusters"] == 3
    assert [entry["dimensions"]["overall"][o]["value"] for o in ("win", "tie", "loss")] == [0.5, 0.5, 0.0]
    # alice and bob split on every item (stage2 / tie): no majority to compare the verdict with
    assert entry["safety_agreement"]["no_majority"] == 6
    # Alpha, two raters, stage2 A on k items and B on j = 6 - k (positions A=0, tie=1, B=2): n_A = k,
    # n_tie = 6, n_B = j, n = 12; mid-ranks k/2, k + 3, k + 6 + j/2.
    k = sum(row["model_a"] == "stage2" for row in key)
    j = 6 - k
    d_at, d_tb, d_ab = ((k + 6) / 2) ** 2, ((6 + j) / 2) ** 2, (k / 2 + 6 + j / 2) ** 2
    observed = 2 * k * d_at + 2 * j * d_tb
    expected = 2 * (k * 6 * d_at + 6 * j * d_tb + k * j * d_ab)
    assert k not in (0, 3, 6)  # unequal marginals, so ordinal and interval alpha differ
    alpha = entry["dimensions"]["overall"]["alpha"]["value"]
    assert alpha == pytest.approx(1 - 11 * observed / expected, abs=1e-6)


# --- bad input ------------------------------------------------------------------------------------


def bad_sheet_cases():
    """(name, change to alice's rows, expected message after '<path>: '). Rows 2.. are items 1..5."""
    def unknown(rows):
        rows[1]["item_id"] = "item-0099"

    def missing(rows):
        rows[0]["respectful"] = "  "

    def outside(rows):
        rows[2]["overall"] = "C"

    def twice(rows):
        rows[3]["item_id"] = rows[1]["item_id"]

    def changed(rows):
        rows[4]["response_b"] = "another reply"

    return [
        ("unknown id", unknown, "row 3: item_id 'item-0099' is not in the key"),
        ("missing rating", missing, "row 2: item item-0001 has no respectful rating (rate it A, tie, B)"),
        ("outside the scale", outside, "row 4: item item-0003's overall rating 'C' is outside the scale A, tie, B"),
        ("rated twice", twice, "row 5: item item-0002 is rated twice (first in row 3)"),
        ("stale sheet", changed, "row 6: item item-0005's context or replies differ from the ones the key"),
    ]


@pytest.mark.parametrize("name, change, message", bad_sheet_cases(), ids=[case[0] for case in bad_sheet_cases()])
def test_a_bad_sheet_is_one_line_naming_the_file_and_row(tmp_path, name, change, message):
    sheets, key = write_inputs(tmp_path)
    with open(sheets / "alice.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    change(rows)
    write_csv(rows, SHEET_COLUMNS, sheets / "alice.csv")
    with pytest.raises(DataError) as error:
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    assert str(error.value).startswith(f"{sheets / 'alice.csv'}: {message}")
    assert "\n" not in str(error.value)


def test_a_sheet_without_a_column_or_not_utf8_or_empty_is_named(tmp_path):
    sheets, key = write_inputs(tmp_path)
    path = sheets / "alice.csv"
    write_csv([{c: v for c, v in row.items() if c != "coherent"} for row in blank_sheet([1])],
              [c for c in SHEET_COLUMNS if c != "coherent"], path)
    with pytest.raises(DataError, match=f"^{path}: missing column 'coherent'"):
        ratings.run(CONFIG, COMPARISONS, [path], key, tmp_path / "out")
    path.write_bytes(",".join(SHEET_COLUMNS).encode() + b"\nitem-0001,caf\xe9\n")
    with pytest.raises(DataError, match=f"^{path}: not UTF-8 text"):
        ratings.run(CONFIG, COMPARISONS, [path], key, tmp_path / "out")
    write_csv([], SHEET_COLUMNS, path)
    with pytest.raises(DataError, match=f"^{path}: no rated row"):
        ratings.run(CONFIG, COMPARISONS, [path], key, tmp_path / "out")
    path.write_text(",".join(SHEET_COLUMNS) + "\nitem-0001,a,b,c,A,A,A,A,A,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{path}: row 2 has 10 cells, the header 9"):
        ratings.run(CONFIG, COMPARISONS, [path], key, tmp_path / "out")


def test_a_bad_key_is_one_line_naming_the_file_and_row(tmp_path):
    sheets, key = write_inputs(tmp_path)
    rows = key_rows()
    rows[2]["model_b"] = "gpt4"
    write_csv(rows, KEY_COLUMNS, key)
    with pytest.raises(DataError, match=f"^{key}: row 4: models 'ce' and 'gpt4' are not a pair of "
                                        "evaluate.human_eval_comparisons"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    rows = key_rows()
    rows[0]["safety_b"] = "unsafe"
    write_csv(rows, KEY_COLUMNS, key)
    with pytest.raises(DataError, match=f"^{key}: row 2: safety_b = 'unsafe' is not one of casual"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    without = [c for c in KEY_COLUMNS if c != "digest"]
    write_csv([{c: row[c] for c in without} for row in rows], without, key)
    with pytest.raises(DataError, match=f"^{key}: missing column 'digest'"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")
    key.unlink()
    with pytest.raises(DataError, match="the human-evaluation key is missing"):
        ratings.run(CONFIG, COMPARISONS, [sheets], key, tmp_path / "out")


def test_two_sheets_of_one_rater_and_a_missing_path_are_errors(tmp_path):
    sheets, key = write_inputs(tmp_path)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "alice.csv").write_bytes((sheets / "alice.csv").read_bytes())
    with pytest.raises(DataError, match="a second sheet of rater 'alice'"):
        ratings.run(CONFIG, COMPARISONS, [sheets, tmp_path / "more"], key, tmp_path / "out")
    with pytest.raises(DataError, match="nowhere: no such sheet or folder of sheets"):
        ratings.run(CONFIG, COMPARISONS, [tmp_path / "nowhere"], key, tmp_path / "out")


# --- no sheets ------------------------------------------------------------------------------------


def test_no_rated_sheets_skips_cleanly_and_says_so(tmp_path, caplog):
    folder = tmp_path / "ratings"
    folder.mkdir()
    (folder / "README.md").write_text("how to rate\n")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = ratings.run(CONFIG, COMPARISONS, [folder], tmp_path / "no_key.csv", out)  # the key is not read
    assert result["status"] == "no rated sheets" and result["comparisons"] == []
    assert "no rated sheets (*.csv) in" in caplog.text and "saying so" in caplog.text
    saved = json.loads((out / "ratings.json").read_text(encoding="utf-8"))
    assert saved["status"] == "no rated sheets"
    assert (out / "ratings.md").read_text(encoding="utf-8").startswith("# Human ratings\n\n*No rated sheets.*")
    assert (out / "judgements.csv").read_text(encoding="utf-8").strip() == ",".join(ratings.JUDGEMENT_COLUMNS)


def test_the_committed_ratings_folder_holds_no_sheet(repo_root):
    # dvc.yaml's ratings stage reads data/ratings: on a fresh clone it must exist and hold no CSV
    folder = repo_root / "data" / "ratings"
    assert (folder / "README.md").is_file() and not list(folder.glob("*.csv"))


# --- config and CLI -------------------------------------------------------------------------------


def test_the_ratings_section_rejects_unknown_keys_and_small_bootstraps():
    with pytest.raises(ConfigError, match="unknown key 'ratings.samples'"):
        section_from_dict({"samples": 100}, "ratings", RatingsConfig)
    with pytest.raises(ConfigError, match="ratings.bootstrap_samples = 10"):
        section_from_dict({"bootstrap_samples": 10}, "ratings", RatingsConfig)


def write_params(path):
    path.write_text("evaluate:\n  human_eval_comparisons: [[stage2, ce], [stage2, base]]\n"
                    "ratings:\n  bootstrap_samples: 100\n  seed: 0\n", encoding="utf-8")
    return path


def test_cli_reads_the_sheets_and_writes_the_reports(tmp_path):
    sheets, key = write_inputs(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ratings", "--sheets", str(sheets / "alice.csv"), "--sheets",
                                      str(sheets / "bob.csv"), "--key", str(key), "--out", str(out),
                                      "--params", str(write_params(tmp_path / "params.yaml"))])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "ratings.json").read_text(encoding="utf-8"))
    assert saved["raters"] == ["alice", "bob"] and saved["config"]["bootstrap_samples"] == 100
    assert by_name(saved)["stage2_vs_ce"]["dimensions"]["overall"]["win"]["value"] == 0.5


def test_cli_reports_a_bad_sheet_in_one_line_and_skips_without_sheets(tmp_path):
    sheets, key = write_inputs(tmp_path)
    params = write_params(tmp_path / "params.yaml")
    rows = fill(blank_sheet([1]), key_rows(), alice)
    rows[0]["engaged"] = "maybe"
    write_csv(rows, SHEET_COLUMNS, sheets / "alice.csv")
    result = CliRunner().invoke(app, ["ratings", "--sheets", str(sheets), "--key", str(key), "--out",
                                      str(tmp_path / "out"), "--params", str(params)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (f"error: {sheets / 'alice.csv'}: row 2: item item-0001's engaged "
                                                      "rating 'maybe' is outside the scale A, tie, B")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["ratings", "--sheets", str(empty), "--key", str(key), "--out",
                                      str(tmp_path / "out"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "ratings.json").read_text())["status"] == "no rated sheets"


def test_ratings_help_names_its_options():
    result = CliRunner().invoke(app, ["ratings", "--help"])
    assert result.exit_code == 0
    for option in ("--sheets", "--key", "--out", "--params"):
        assert option in result.output
