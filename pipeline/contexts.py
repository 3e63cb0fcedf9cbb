"""Context keys, and the two halves of the human-labelled train replies: one for the method, one for the
judge, so that no component grades its own work.

DiaSafety's and ToxiChat's human-labelled train replies would otherwise serve three masters: the judge's
unsafe class, the stage-1 negatives (many of them replies to *other* contexts) and DExperts'
anti-expert. A method trained to avoid exactly what the judge learned to flag lowers the judged rate by
agreeing with the judge. So the train rows of `judge.corpora` are split by context: a share
`judge.share` of the contexts goes to the judge (`judge` trains on those rows only), the rest to the
method (`mine` reads only those rows, as positives, negatives and the hard/random pools; `experts`
trains on only those). Validation and test rows are not split.

Near-duplicate contexts go to the same half: the key is the context's first turn (DiaSafety's one
context utterance; ToxiChat's Reddit post, which every turn and reply of its threads follows) up to case,
punctuation, markup and spacing (`normalized_text`). A context's half is fixed by a hash of its key, so
it does not depend on the order of rows, on other rows or on a seed, and the two halves are the same in
every stage that reads them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Sequence

import numpy as np

# Markup a scraped utterance carries around the same words: HTML tags and entities, URLs, Markdown
# links (their text is kept) and emphasis, Reddit quote markers, escaped line breaks.
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"<[^<>]{0,200}>|&[a-z]{2,8};|&#\d{1,6};|https?://\S+|www\.\S+|\\[nrt]")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalized_text(text: str) -> str:
    """`text` lower-cased, without markup, punctuation and extra spacing: the form near-duplicates share."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = _MARKUP.sub(" ", _LINK.sub(r" \1 ", text))
    return " ".join(_NOT_WORD.sub(" ", text).split())


def context_key(context: Sequence[str]) -> str:
    """The key of a context (turns, oldest first): its first turn's `normalized_text`."""
    return normalized_text(context[0]) if len(context) else ""


def key_fraction(key: str) -> float:
    """A number in [0, 1) fixed by the key (its SHA-256), uniform over keys."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def judge_half(contexts: Sequence[Sequence[str]], share: float) -> np.ndarray:
    """(n,) bool: the contexts whose labelled train replies belong to the judge (a share `share` of the
    keys); the others belong to the method."""
    return np.array([key_fraction(context_key(context)) < share for context in contexts], dtype=bool)


class Halves:
    """The split of `corpora`'s train rows by context: a share `share` of the keys is the judge's."""

    def __init__(self, corpora: Sequence[str], share: float):
        self.corpora, self.share = tuple(corpora), share

    def of(self, corpus: str, table, judge: bool = False):
        """The rows of a train split `table` (with a `context` column) that are the method's (or, with
        `judge`, the judge's); every row of a corpus outside `corpora`."""
        import pyarrow as pa

        if corpus not in self.corpora:
            return table
        half = judge_half(table.column("context").to_pylist(), self.share)
        return table.filter(pa.array(half if judge else ~half))

    def record(self) -> dict:
        return {"corpora": list(self.corpora), "share": self.share, "key": "the first turn, normalized "
                "(pipeline.contexts.context_key)"}


# Corpora whose bootstrap cluster is the context's first turn rather than its dialogue: ToxiChat's threads
# share Reddit posts (142 test threads on 119 posts), and its split is keyed on the post.
CLUSTER_BY_FIRST_TURN = ("toxichat",)


def cluster_key(corpus: str, dialogue_id: str, context: Sequence[str]) -> str:
    """The unit a bootstrap draws for a row: `<corpus>/<dialogue_id>`, or for a corpus of
    `CLUSTER_BY_FIRST_TURN`, `<corpus>/<the context's key>` (all threads on one post together)."""
    if corpus in CLUSTER_BY_FIRST_TURN:
        return f"{corpus}/{context_key(context)}"
    return f"{corpus}/{dialogue_id}"
