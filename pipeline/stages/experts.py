"""experts: DExperts' expert and anti-expert, fine-tuned from the base model with cross-entropy on
human-labelled safe and unsafe replies (`pipeline/dexperts.py` decodes with them).

Reads `params.yaml` section `dexperts`, the base model (`models/base`) and the train and validation
splits of the `dexperts.corpora` (`data/normalized/<corpus>/<split>.parquet`). A row's reply goes to
the anti-expert when humans labelled it unsafe (`reply_label`, DiaSafety and ToxiChat), to the expert
otherwise (DiaSafety's and ToxiChat's safe replies, ProsocialDialog's prosocial ones, MIC's answers
that keep their RoT); each known unacceptable reply of a row (`unacceptable_responses`: MIC's
RoT-violating answers) of severity `dexperts.min_violation_severity` or worse goes to the anti-expert
too. A (context, reply) pair is kept once per expert. Each expert starts from its own copy of the base
model and is trained like the base model's pretraining (`finetune.fit_pairs`: the reply without a RoT
as target, in the base model's format; AdamW, linear schedule; LoRA with `dexperts.lora`; at most
`dexperts.max_examples` pairs, a seeded sample).
Writes `<out>/expert/` and `<out>/antiexpert/` (save_pretrained, with the base model's tokenizer) and
`<out>/experts.json` (counts per corpus, validation loss and perplexity before and after, config,
provenance; no timing).

    python -m pipeline experts --init models/base --normalized data/normalized --out models/experts
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, staged_dir, write_json
from pipeline.config import SPLITS, DExpertsConfig
from pipeline.contexts import Halves
from pipeline.dexperts import ANTIEXPERT, EXPERT
from pipeline.errors import DataError
from pipeline.schemas import read_table

log = logging.getLogger(__name__)

COLUMNS = ("context", "persona", "emotion", "response", "reply_label", "unacceptable_responses")
UNSAFE = "unsafe"


def expert_pairs(normalized: Path, config: DExpertsConfig, split: str, limit: int,
                 halves: Halves | None = None) -> tuple[dict[str, pa.Table], dict]:
    """The (context, reply) pairs of `split` for each expert, as tables in `finetune.fit_pairs`' row
    format (`scoring.GROUP_COLUMNS` without negatives, the reply the positive), in corpus and file order; at most `limit` per expert (0: all),
    a seeded sample kept in file order; of a train split, only the method's half of the judge corpora
    (`halves`, `pipeline/contexts.py`). Returns the tables and, per corpus, the file's rows, SHA-256 and
    pairs per expert."""
    pairs: dict[str, list[dict]] = {EXPERT: [], ANTIEXPERT: []}
    seen: dict[str, set] = {EXPERT: set(), ANTIEXPERT: set()}
    read = {}
    for corpus in config.corpora:
        path = normalized / corpus / f"{split}.parquet"
        table = read_table(path, COLUMNS, missing_hint="dexperts.corpora lists it; run the normalize stage first")
        rows_in_file = table.num_rows
        if halves is not None and split == "train":
            table = halves.of(corpus, table)
        counts = {EXPERT: 0, ANTIEXPERT: 0}
        for index, row in enumerate(table.to_pylist()):
            replies = [(ANTIEXPERT if row["reply_label"] == UNSAFE else EXPERT, row["response"])]
            replies += [(ANTIEXPERT, n["text"]) for n in row["unacceptable_responses"] or []
                        if n["severity"] >= config.min_violation_severity]
            for which, reply in replies:
                key = (tuple(row["context"]), tuple(row["persona"] or ()), row["emotion"], reply)
                if not reply or not reply.strip() or key in seen[which]:
                    continue
                seen[which].add(key)
                counts[which] += 1
                pairs[which].append({"group_id": f"{corpus}/{index}/{counts[which]}", "context": row["context"],
                                     "persona": row["persona"], "emotion": row["emotion"], "positive": reply,
                                     "rots": [], "negatives": []})
        read[corpus] = {"rows": rows_in_file, "method_rows": table.num_rows, "sha256": sha256(path), "pairs": counts}
    tables = {}
    for which, rows in pairs.items():
        if not rows:
            raise DataError(f"{normalized}: the {split} splits of {', '.join(config.corpora)} have no "
                            f"{'unsafe' if which == ANTIEXPERT else 'safe'} reply for the {which} (dexperts.corpora)")
        if limit and len(rows) > limit:
            stream = [config.seed, SPLITS.index(split), (EXPERT, ANTIEXPERT).index(which)]
            keep = np.random.default_rng(stream).choice(len(rows), size=limit, replace=False)
            rows = [rows[i] for i in sorted(keep.tolist())]
        tables[which] = pa.Table.from_pylist(rows)
    return tables, read


def run(config: DExpertsConfig, init: Path, normalized: Path, out: Path, halves: Halves | None = None) -> dict:
    """Train the expert and the anti-expert from the model at `init` (on the method's half of the judge
    corpora's train replies, with `halves`); write them to `<out>/expert`, `<out>/antiexpert` and the
    record to `<out>/experts.json`; returns the record."""
    from pipeline.finetune import fit_pairs
    from pipeline.scoring import load_init_model

    ensure_writable(out)
    started = time.perf_counter()
    train, train_read = expert_pairs(normalized, config, "train", config.max_examples, halves)
    validation, validation_read = expert_pairs(normalized, config, "validation", config.max_validation_examples)
    log.info("experts: %s", "; ".join(f"{c}: {r['pairs'][EXPERT]} safe, {r['pairs'][ANTIEXPERT]} unsafe"
                                      for c, r in train_read.items()))
    record = {"init": str(init), "config": dataclasses.asdict(config), "halves": halves.record() if halves else None,
              "corpora": {c: {"train": train_read[c], "validation": validation_read[c]} for c in config.corpora},
              "experts": {}, "git_commit": git_commit(), "library_versions": library_versions()}
    with staged_dir(out) as staging:
        for which in (EXPERT, ANTIEXPERT):
            dm = load_init_model(init)  # a fresh copy of the base model for each expert
            model, result, timing = fit_pairs(dm, train[which], validation[which], config, f"experts: {which}",
                                              "dexperts")
            record["experts"][which] = result
            model.save_pretrained(staging / which)
            dm.tokenizer.save_pretrained(staging / which)
            log.info("experts: %s: %d pairs, validation perplexity %.2f -> %.2f (%.0f tokens/s)", which,
                     result["pairs"]["train"], result["validation"]["before"]["perplexity"],
                     result["validation"]["after"]["perplexity"], timing["tokens_per_second"] or 0)
        write_json(record, staging / "experts.json")
    log.info("experts: wrote %s in %.1f s", out, time.perf_counter() - started)
    return record
