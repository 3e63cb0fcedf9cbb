"""score: how a model ranks the test groups, how well it predicts the reference replies, and how
much likelier it finds humans' safe replies than their unsafe ones.

Reads one model folder, the test groups of both training stages (`data/groups/stage1/test.parquet`,
`data/groups/stage2/test.parquet`; a group replayed into stage 2 counts once) and the human-labelled
replies of DiaSafety's and ToxiChat's test splits (`data/normalized/{diasafety,toxichat}/test.parquet`,
`reply_label` safe or unsafe). Every group is scored exactly as training validation does
(`scoring.per_group_scores`, with the `train` section's format, score, batch and precision settings;
on the GPU when there is one), and so is every labelled reply, as a positive without negatives: its
target is the reply alone (no RoT, in the model's format), its score the log-likelihood of the reply
tokens (and eos) given its context, a mean over them with `train.length_normalized` (the score the
n-pair loss compares). Writes
`<out>/eval_scores.json`:

- `group_ranking_accuracy`: the share of test groups whose prosocial positive outscores every
  socially unacceptable negative, with a bootstrap 95% interval over dialogues;
- `reference_ppl`: token-level perplexity of the reference targets (RoT and reply) given their context;
- `reference_ppl_per_word`: per scope (overall, adversarial, casual, each corpus), the reference replies'
  perplexity per word (the reply tokens' likelihood over their words: models with different tokenizers
  compare), uncut replies only;
- `likelihood_auc`, per corpus and over both (`overall`): the AUC with which the score separates safe
  from unsafe replies (P(score(safe) > score(unsafe)), ties half; higher is better), with a
  cluster-bootstrap 95% interval over dialogues;
- `same_context_pairs`, likewise: over every (safe, unsafe) pair of replies to the same context
  (ToxiChat's two chatbot replies that humans labelled differently, DiaSafety's repeated contexts),
  the share the model ranks right (a tie counts half);

and `<out>/likelihood.parquet` (`schemas.LIKELIHOOD`), the score of every labelled reply, from which
`evaluate` compares two models on the same replies. `evaluate` puts all of these next to the
generation metrics of the same model.

    python -m pipeline score stage2 --model models/stage2 --groups data/groups --normalized data/normalized \\
        --out reports/scores/stage2

With `--experts`, the model at `--model` is scored under the DExperts combination with those experts
(`dexperts.alpha`, no filtering): the likelihood DExperts samples from, for `score dexperts`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import devices
from pipeline.artifacts import ensure_writable, staged_dir, write_json, write_parquet
from pipeline.config import ADVERSARIAL_CORPORA, CASUAL_CORPORA, CORPORA, DIALOG_SAFETY_CORPORA, EvaluateConfig, TrainConfig
from pipeline.contexts import cluster_key
from pipeline.errors import DataError
from pipeline.labels import REPLY_LABELS
from pipeline.likelihood import context_id, likelihood_safety
from pipeline.metrics import bootstrap_ci
from pipeline.modeling import DialogModel
from pipeline.schemas import LIKELIHOOD, read_table
from pipeline.scoring import (
    GroupScorer, encode_groups, load_init_model, per_group_scores, read_groups, validation_metrics, validation_sums,
)

log = logging.getLogger(__name__)

REPLY_COLUMNS = ("dialogue_id", "turn_index", "context", "persona", "emotion", "response", "reply_label",
                 "reply_category", "responder")


def test_groups(groups: Path) -> pa.Table:
    """The test groups of both stages, each group once (stage 2 replays some stage-1 groups)."""
    tables = [read_groups(groups / f"stage{k}", "test") for k in (1, 2)]
    table = pa.concat_tables(tables)
    seen, keep = set(), []
    for index, group_id in enumerate(table["group_id"].to_pylist()):
        if group_id not in seen:
            seen.add(group_id)
            keep.append(index)
    return table.take(keep)


# --- likelihood safety -----------------------------------------------------------------------------


def labelled_replies(normalized: Path) -> pa.Table:
    """Every reply with a human label in the test splits of `DIALOG_SAFETY_CORPORA`: the `LIKELIHOOD`
    columns but the scores, plus `persona` and `emotion` for the source."""
    parts = []
    for corpus in DIALOG_SAFETY_CORPORA:
        path = Path(normalized) / corpus / "test.parquet"
        rows = read_table(path, REPLY_COLUMNS, missing_hint="run the normalize stage first").to_pylist()
        rows = [row for row in rows if row["reply_label"] is not None]
        unknown = sorted({row["reply_label"] for row in rows} - set(REPLY_LABELS))
        if unknown:
            raise DataError(f"{path}: reply_label {unknown[0]!r} is not one of {', '.join(REPLY_LABELS)}")
        if not rows:
            raise DataError(f"{path}: no reply with a human label (reply_label)")
        repeated = [key for key, n in Counter((row["dialogue_id"], row["turn_index"]) for row in rows).items() if n > 1]
        if repeated:
            raise DataError(f"{path}: (dialogue_id, turn_index) {repeated[0]} names two labelled replies")
        parts += [{"corpus": corpus, "reply_id": f"{row['dialogue_id']}/{row['turn_index']}",
                   "context_id": context_id(row["context"]), "reply": row["response"], **row} for row in rows]
    return pa.Table.from_pylist(parts)


def score_replies(scorer, replies: pa.Table, config: TrainConfig) -> dict[str, np.ndarray]:
    """Each reply scored as training scores a positive without negatives (`scoring.per_group_scores`):
    `score`, the reply tokens' log-likelihood (mean or sum, `config.length_normalized`); `tokens`, how
    many there are; `cut`, whether the target was cut at `config.max_target_tokens`."""
    groups = pa.Table.from_pylist([{"context": row["context"], "persona": row["persona"], "emotion": row["emotion"],
                                    "positive": row["reply"], "rots": [], "negatives": []}
                                   for row in replies.select(["context", "persona", "emotion", "reply"]).to_pylist()])
    encoded = encode_groups(DialogModel(scorer.model, scorer.tokenizer, scorer.is_seq2seq), groups, config)
    per_reply = per_group_scores(scorer, encoded, list(range(len(encoded))), config)
    return {"score": per_reply["positive_score"].numpy(),
            "tokens": np.array([len(ids[0]) - start[0]
                                for ids, start in zip(encoded.target_ids, encoded.reply_starts)]),
            "cut": encoded.cut[:, 0].numpy()}


def per_word_perplexity(table: pa.Table, encoded, per_group: dict, length_normalized: bool) -> dict[str, dict]:
    """The test groups' reference replies' perplexity per word, which compares models whose tokenizers
    differ: exp(the reply tokens' summed negative log-likelihood (eos included; the RoT and markers not)
    / the replies' whitespace-separated words), overall, over the adversarial and the casual corpora,
    and per corpus, each `{"value", "n"}` with n the words. Positives cut at `train.max_target_tokens`
    are left out: their likelihood is of part of the reply."""
    per_token = per_group["positive_score"].numpy()
    tokens = np.array([len(ids[0]) - starts[0] for ids, starts in zip(encoded.target_ids, encoded.reply_starts)])
    nll = -per_token * (tokens if length_normalized else 1)
    words = np.array([len(text.split()) for text in table["positive"].to_pylist()])
    keep = ~encoded.cut[:, 0].numpy()
    corpora = np.array(table["corpus"].to_pylist())
    scopes = {"overall": CORPORA, "adversarial": ADVERSARIAL_CORPORA, "casual": CASUAL_CORPORA,
              **{corpus: (corpus,) for corpus in sorted(set(corpora.tolist()))}}
    figures = {}
    for scope, members in scopes.items():
        mask = np.isin(corpora, list(members)) & keep
        if words[mask].sum():
            figures[scope] = {"value": float(np.exp(nll[mask].sum() / words[mask].sum())), "n": int(words[mask].sum())}
    return figures


def _shown(record: dict) -> str:
    if record["value"] is None:
        return f"none ({record['reason']})"
    ci = record["ci"]
    return f"{record['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" (n {record['n']})"


# --- run ------------------------------------------------------------------------------------------


def run(train_config: TrainConfig, evaluate_config: EvaluateConfig, name: str, model: Path, groups: Path,
        normalized: Path, out: Path, experts: Path | None = None, alpha: float = 0.0) -> dict:
    """Score the test groups and the labelled replies with the model at `model`; write
    `<out>/eval_scores.json` and `<out>/likelihood.parquet`. With `experts` (DExperts' folder), the
    scores are the DExperts combination's (`pipeline.dexperts.Ensemble`, weight `alpha`) with the
    model at `model` guided."""
    started = time.time()
    ensure_writable(out)
    precision = devices.resolve_precision(train_config.precision, "train.precision")
    table = test_groups(Path(groups))
    replies = labelled_replies(Path(normalized))
    dm = load_init_model(Path(model))
    device = devices.model_device()
    dm.model.to(device).eval()
    encoded = encode_groups(dm, table, train_config)
    scorer = GroupScorer(dm)
    if experts is not None:
        from pipeline.dexperts import Ensemble, load_experts

        scorer = Ensemble(dm, load_experts(experts, dm, alpha, device))
        log.info("score %s: the DExperts combination of %s and the experts in %s (alpha %g)", name, model, experts,
                 alpha)
    with devices.autocast(device, precision):
        per_group = per_group_scores(scorer, encoded, list(range(len(encoded))), train_config)
        scored = score_replies(scorer, replies, train_config)
    metrics = validation_metrics(validation_sums(per_group))
    # Groups of one dialogue (a ProsocialDialog conversation, a MIC question) are resampled together.
    clusters = [cluster_key(c, d, t) for c, d, t in zip(table["corpus"].to_pylist(), table["dialogue_id"].to_pylist(),
                                                         table["context"].to_pylist())]
    low, high = bootstrap_ci(per_group["ranked_first"].tolist(), n_samples=evaluate_config.bootstrap_samples,
                             seed=evaluate_config.seed, clusters=clusters)
    tokens = int(per_group["positive_tokens"].sum())
    scores = {
        "group_ranking_accuracy": {"value": metrics["ranking_accuracy"], "ci": [low, high], "n": metrics["groups"],
                                   "n_clusters": len(set(clusters))},
        "reference_ppl": {"value": metrics["perplexity"], "n": tokens},
        "reference_ppl_per_word": per_word_perplexity(table, encoded, per_group, train_config.length_normalized),
    }
    replies = pa.Table.from_pydict({**{c: replies[c] for c in LIKELIHOOD.names if c in replies.column_names},
                                    **scored}).select(LIKELIHOOD.names).cast(LIKELIHOOD)
    scores.update(likelihood_safety(replies, evaluate_config.bootstrap_samples, evaluate_config.seed))
    with staged_dir(out) as folder:
        write_json(scores, folder / "eval_scores.json")
        write_parquet(replies, folder / "likelihood.parquet")
    cut = encoded.cut_counts()
    log.info("score %s: %d test groups on %s (%s; %d positive and %d negative targets cut at "
             "train.max_target_tokens), ranking accuracy %.3f [%.3f, %.3f], reference perplexity %.2f",
             name, metrics["groups"], device, precision, cut["positives"], cut["negatives"],
             metrics["ranking_accuracy"], low, high, metrics["perplexity"])
    for scope in scores["likelihood_auc"]:
        log.info("score %s: %s likelihood AUC of safe over unsafe replies %s; same-context pairs ranked right %s",
                 name, scope, _shown(scores["likelihood_auc"][scope]), _shown(scores["same_context_pairs"][scope]))
    log.info("score %s: %d labelled replies (%d cut at train.max_target_tokens) -> %s (%.1f s)", name, len(replies),
             int(scored["cut"].sum()), out, time.time() - started)
    return scores
