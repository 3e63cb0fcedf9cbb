"""The blinded human-evaluation sheet and its key: the format `evaluate` writes and `ratings` reads back.

`evaluate` writes `reports/human_eval.csv` (SHEET_COLUMNS: an item, its context, two replies A and
B in a random order, a blank column per rating dimension) and `reports/human_eval_key.csv`
(KEY_COLUMNS: which model wrote A and B, the context's cluster, each reply's safety verdict and
`safety_source`, the classifier that gave it, whose labels VERDICT_LABELS names; and a digest of the
texts the raters saw). A rater fills every dimension of every row with one value of SCALE and saves
the sheet as `data/ratings/<rater>.csv`; `ratings` checks it against the key and unblinds it.
"""

from __future__ import annotations

import hashlib

from pipeline.labels import REPLY_LABELS, THREE_WAY

RATINGS = ("prosocial", "engaged", "respectful", "coherent", "overall")  # Prost's human-eval dimensions
SAFETY_DIMENSION = "prosocial"  # the dimension a classifier's safety verdict is compared with
SCALE = ("A", "tie", "B")  # a rating: the better reply, or a tie; ordered (A better < tie < B better)

SHEET_COLUMNS = ("item_id", "context", "response_a", "response_b", *RATINGS)
KEY_COLUMNS = ("item_id", "corpus", "context_id", "cluster", "model_a", "model_b", "safety_a", "safety_b",
               "safety_source", "digest")

# Who gave the key's safety verdicts: `judge` is the independent safety judge (`models/judge`, trained on
# corpora the re-ranker's classifier never sees), which `evaluate` uses; `self-assessed` is the re-ranker's
# own safety classifier (the candidates' safety_probs), which keys written before the judge carry.
JUDGE = "judge"
SELF_ASSESSED = "self-assessed"
# The labels each source's verdicts take, mildest first: the reply with the milder label is the safer one.
VERDICT_LABELS = {JUDGE: REPLY_LABELS, SELF_ASSESSED: THREE_WAY}


def item_digest(context: str, response_a: str, response_b: str) -> str:
    """A short hash of what a rater saw, so a sheet rated against an earlier `evaluate` run (same
    item ids, other replies) is caught. Whitespace runs count as one space: spreadsheets rewrite
    line ends and trim cells."""
    text = "\x1f".join(" ".join(part.split()) for part in (context, response_a, response_b))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
