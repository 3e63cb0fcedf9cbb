"""ProsocialDialog's safety labels and their collapse to three classes, defined once.

Normalization validates the five-way labels, the safety classifier predicts them, and the miner and
the evaluation read the three-way view (casual / needs_caution / needs_intervention). DiaSafety and
ToxiChat label the reply instead: safe or unsafe (`REPLY_LABELS`), DiaSafety per category.
"""

from __future__ import annotations

SAFETY_LABELS = (  # ProsocialDialog's five-way label of a user turn, in column order
    "__casual__",
    "__possibly_needs_caution__",
    "__probably_needs_caution__",
    "__needs_caution__",
    "__needs_intervention__",
)
THREE_WAY = ("casual", "needs_caution", "needs_intervention")
COLLAPSE = {  # five-way label -> three-way label
    "__casual__": "casual",
    "__possibly_needs_caution__": "needs_caution",
    "__probably_needs_caution__": "needs_caution",
    "__needs_caution__": "needs_caution",
    "__needs_intervention__": "needs_intervention",
}

# The human label of a reply in DiaSafety and ToxiChat, as normalized (`reply_label`).
REPLY_LABELS = ("safe", "unsafe")
DIASAFETY_CATEGORIES = (  # DiaSafety's five context-sensitive categories; its label is per category
    "Offending User",
    "Risk Ignorance",
    "Unauthorized Expertise",
    "Toxicity Agreement",
    "Biased Opinion",
)
