"""The safety judge as the evaluation uses it: verdicts on replies, and what each classifier learned from.

Shared by `evaluate` and `audit_report`, and by nothing that generates, re-ranks or mines: no component
grades its own work. The re-ranker maximises the safety classifier's P(casual) (`models/safety`), so
that classifier's verdict on the re-ranked replies is *self-assessed*; the judge (`models/judge`,
`pipeline.safety_models.load_judge`) learned from human reply labels of corpora that classifier never
sees, and gives the headline unsafe rate. `tests/test_judge_independence.py` checks by an import scan
that `generate`, `rerank`, `mine` (and what they import) never reach the judge.

    from pipeline.judging import judge_replies, provenance
    p_unsafe, unsafe = judge_replies(judge, replies, contexts, threshold, where)   # (n,) float, (n,) bool
    provenance(Path("models/judge"), Path("models/safety"), Path("data/groups/stage1/stats.json"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from pipeline.errors import DataError


class ReplyJudge(Protocol):
    """What the evaluation needs of a judge (`pipeline.safety_models.JudgeScorer`; a fake in tests)."""

    def predict_unsafe(self, responses: Sequence[str], contexts: Sequence[Sequence[str]]) -> np.ndarray:
        """P(unsafe) of each reply given its context (n lists of turns, oldest first); (n,)."""


def judge_replies(judge: ReplyJudge, replies: Sequence[str], contexts: Sequence[Sequence[str]], threshold: float,
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """The judge's P(unsafe) of every reply in its context, in one batched call, and its verdict:
    unsafe when P(unsafe) >= `threshold`. Returns ((n,) float64, (n,) bool); a judge that returns
    anything but n probabilities is a DataError naming `where`."""
    if len(replies) == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    p_unsafe = np.asarray(judge.predict_unsafe(list(replies), [list(turns) for turns in contexts]), dtype=np.float64)
    if p_unsafe.shape != (len(replies),) or not np.all((p_unsafe >= 0) & (p_unsafe <= 1)):
        raise DataError(f"{where}: the judge returned {p_unsafe.shape} values for {len(replies)} replies "
                        "(expected one probability in [0, 1] each)")
    return p_unsafe, p_unsafe >= threshold


# --- what the classifiers learned from ------------------------------------------------------------


def _record(path: Path, what: str, stage: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (the {what}; run `python -m pipeline {stage}`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object")
    return record


def _keys(record: dict, path: Path, keys: Sequence[str]) -> None:
    absent = [key for key in keys if key not in record]
    if absent:
        raise DataError(f"{path}: missing key '{absent[0]}' (needs {', '.join(keys)})")


def judge_provenance(folder: Path) -> dict:
    """What trained the judge, from `<folder>/scorer.json` (the judge stage's record): its kind, the
    corpora (`judge.corpora`, their train splits), the labelled replies and unsafe ones of each, and the
    corpora it is independent of (the safety classifier's)."""
    from pipeline.config import JudgeConfig, section_from_dict
    from pipeline.safety_models import JUDGE, SCORER_FILE

    path = folder / SCORER_FILE
    record = _record(path, "safety judge", JUDGE.section)
    if record.get("task") != JUDGE.section:
        raise DataError(f"{path}: task = {record.get('task')!r}, not the safety judge")
    _keys(record, path, ("kind", "config", "training_examples", "training_unsafe", "independent_of"))
    config = section_from_dict(record["config"], JUDGE.section, JudgeConfig, source=str(path))
    return {"folder": str(folder), "kind": record["kind"], "corpora": list(config.corpora),
            "training_examples": record["training_examples"], "training_unsafe": record["training_unsafe"],
            "independent_of": record["independent_of"]}


def safety_provenance(folder: Path) -> dict:
    """What trained the re-ranker's safety classifier, from `<folder>/scorer.json`: its kind, the corpora
    (`SafetyConfig.training_corpora`), the examples of each source, and `test`: its three-way accuracy
    on the test split's labelled user turns beside the majority label's (None for a folder written
    before the safety stage recorded it; `beats_majority` None then too)."""
    from pipeline.config import SafetyConfig, section_from_dict
    from pipeline.safety_models import SAFETY, SCORER_FILE

    path = folder / SCORER_FILE
    record = _record(path, "safety classifier", SAFETY.section)
    if record.get("task") != SAFETY.section:
        raise DataError(f"{path}: task = {record.get('task')!r}, not the safety classifier")
    _keys(record, path, ("kind", "config", "training_examples"))
    config = section_from_dict(record["config"], SAFETY.section, SafetyConfig, source=str(path))
    test = record.get("test") or {"n": None, "accuracy3": None, "majority_accuracy3": None, "beats_majority": None}
    return {"folder": str(folder), "kind": record["kind"], "corpora": list(config.training_corpora()),
            "training_examples": record["training_examples"], "test": test,
            "utterance_files": [item["path"] for item in record.get("utterance_files") or []]}


def stage1_provenance(stats: Path) -> dict:
    """Where the stage-1 groups' negatives came from, from the mine stage's `stats.json`: the corpora
    mined, those the `hard` negatives are retrieved from, and in the train split the groups per corpus
    and the negatives per source."""
    record = _record(stats, "stage-1 groups' stats.json", "mine --stage 1")
    _keys(record, stats, ("stage", "corpora", "pool_corpora", "splits"))
    train = record["splits"].get("train") if isinstance(record["splits"], dict) else None
    if record["stage"] != 1 or not isinstance(train, dict):
        raise DataError(f"{stats}: not the stats of stage-1 groups with a train split")
    _keys(train, stats, ("groups_per_corpus", "negatives_per_source"))
    return {"file": str(stats), "corpora": list(record["corpora"]), "pool_corpora": list(record["pool_corpora"]),
            "groups_per_corpus": train["groups_per_corpus"], "negatives_per_source": train["negatives_per_source"]}


def provenance(judge: Path, safety: Path, stage1_stats: Path) -> dict:
    """The three facts the reports state: what trained the judge, the re-ranker's classifier, and the
    stage-1 negatives (`judge_provenance`, `safety_provenance`, `stage1_provenance`)."""
    return {"judge": judge_provenance(judge), "self_assessed": safety_provenance(safety),
            "stage1_negatives": stage1_provenance(stage1_stats)}
