"""When a difference is called a finding: the rules behind every bold cell of the reports.

A paired difference (model − baseline on the same contexts) is *significant*, and printed in bold,
only when all of these hold:

1. its scope has at least `MIN_CLUSTERS` clusters, the units the cluster bootstrap draws (dialogues,
   posts, contexts; never more than the contexts). Below that neither an interval nor a test is
   reported at all (`limit`): a percentile bootstrap over a handful of clusters says little;
2. its paired 95% bootstrap interval excludes 0;
3. its p-value, Holm-corrected over the cells of the table it stands in (`marks`), is below `ALPHA`.
   For a binary rate the p-value is McNemar's exact test on the discordant contexts (evaluate writes
   it); for any other difference (an AUC, perplexity, F1, a share of a set of replies) it is the
   normal approximation from the bootstrap interval (Altman & Bland, BMJ 2011, "How to obtain the P
   value from a confidence interval": se = (high − low) / (2 × 1.96), z = difference / se).

So an interval that excludes 0 while the exact test does not reject (1 against 7 discordant
contexts) is not bold, and neither is one of many cells that passes alone but not after Holm.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

MIN_CLUSTERS = 30
ALPHA = 0.05
_Z = 1.959963984540054  # the 97.5% normal quantile: the bootstrap intervals are 95%
EXACT, FROM_INTERVAL = "McNemar exact", "normal approximation from the bootstrap interval"
RULE = (f"bold when its 95% interval excludes 0 and its p-value, Holm-corrected over the table's cells, is below "
        f"{ALPHA} (McNemar's exact test for rates, the normal approximation from the interval otherwise); no "
        f"interval or test where fewer than {MIN_CLUSTERS} clusters of contexts were drawn")


def units(entry: dict) -> int | None:
    """The units a bootstrap of `entry` drew: its clusters where recorded, else its items."""
    found = entry.get("n_clusters")
    return entry.get("n") if found is None else found


def too_few(entry: dict | None) -> bool:
    """True when `entry` rests on fewer than `MIN_CLUSTERS` clusters."""
    if not entry:
        return False
    found = units(entry)
    return found is not None and found < MIN_CLUSTERS


def limit(entry: dict) -> dict:
    """`entry` (changed in place and returned) without interval and test when it rests on too few
    clusters; `too_few` then records the threshold."""
    if too_few(entry) and (entry.get("ci") is not None or entry.get("p_value") is not None):
        entry["ci"] = None
        if "p_value" in entry:
            entry["p_value"] = None
        entry["too_few"] = MIN_CLUSTERS
    return entry


def limit_all(tree: Any) -> Any:
    """`limit` on every dict with a `ci` key inside `tree` (results.json's nesting), in place."""
    if isinstance(tree, dict):
        if "ci" in tree:
            limit(tree)
        for value in tree.values():
            limit_all(value)
    elif isinstance(tree, list):
        for value in tree:
            limit_all(value)
    return tree


def interval_p_value(difference: float, ci: Sequence[float]) -> float:
    """Two-sided p-value of `difference` from its 95% interval, by the normal approximation."""
    low, high = ci
    se = (high - low) / (2 * _Z)
    if se <= 0:
        return 1.0 if difference == 0 else 0.0
    return math.erfc(abs(difference) / se / math.sqrt(2))


def p_value(entry: dict | None) -> tuple[float | None, str | None]:
    """(p, how it was found) of one difference entry; (None, None) without a test."""
    if not entry or too_few(entry):
        return None, None
    if entry.get("p_value") is not None:
        return float(entry["p_value"]), EXACT
    if entry.get("ci") and entry.get("difference") is not None:
        return interval_p_value(entry["difference"], entry["ci"]), FROM_INTERVAL
    return None, None


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count among the tests)."""
    tested = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    count, adjusted, running = len(tested), [None] * len(p_values), 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (count - rank) * p))
        adjusted[index] = running
    return adjusted


def excludes_zero(entry: dict | None) -> bool:
    ci = (entry or {}).get("ci")
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def marks(entries: Iterable[dict | None]) -> list[dict]:
    """Per entry of one table: {p, method, p_holm, significant}; Holm runs over the entries that have
    a test."""
    entries = list(entries)
    found = [p_value(entry) for entry in entries]
    adjusted = holm([p for p, _ in found])
    return [{"p": p, "method": method, "p_holm": corrected,
             "significant": corrected is not None and corrected < ALPHA and excludes_zero(entry)}
            for entry, (p, method), corrected in zip(entries, found, adjusted)]


def direction(entry: dict | None) -> str | None:
    """'up' / 'down' when a single difference is significant on its own (interval and test agree),
    'same' when it is tested but not significant, None when it has no interval."""
    if not entry or entry.get("ci") is None or too_few(entry):
        return None
    if not marks([entry])[0]["significant"]:
        return "same"
    return "up" if entry["ci"][0] > 0 else "down"
