"""chat: talk to a trained dialog model in the terminal and watch the re-ranker choose (not a DVC stage).

    python -m pipeline chat --model models/stage2 --safety models/safety --agreement models/rot_agreement

Reads user lines from stdin until end of input or `/quit`. For each line it samples `generate.k`
candidates with the decoding settings of params.yaml, scores them with the `generate` stage's own
re-ranking entry point (`pipeline.rerank.score_candidates`), and prints the chosen reply, its RoT, its safety probabilities, its RoT agreement (with
`--agreement`, which `generate.gamma > 0` needs) and the re-ranker's table. The chosen reply joins
the conversation history, which conditions the next reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TextIO

from pipeline.config import GenerateConfig
from pipeline.modeling import DialogModel, Source
from pipeline.rerank import score_candidates, term_weights
from pipeline.sampling import batch_seed, sample_candidates

if TYPE_CHECKING:
    from pipeline.safety_models import AgreementScorer, SafetyScorer

QUIT = "/quit"


def reply(dm: DialogModel, scorer: SafetyScorer, history: list[str], config: GenerateConfig, turn: int,
          agreement_scorer: AgreementScorer | None = None) -> list[dict]:
    """The k scored candidates for the conversation `history` (oldest first, the user's turn last),
    best first; each a dict with rot, response, fluency, fluency_term, safety_probs, prosociality,
    agreement (None without `agreement_scorer`), score, rank, selected, candidate_index. Turn `turn`
    is sampled with its own seed."""
    sampled = sample_candidates(dm, [Source(list(history))], config, batch_seed(config.seed, "chat", turn))
    k = config.k
    scored = score_candidates(config, ["chat"] * k, list(range(k)), sampled.fluency, sampled.rots,
                              sampled.responses, [list(history)] * k, scorer, agreement_scorer)
    verdict = scored.verdict
    rows = [{"candidate_index": j, "rot": sampled.rots[j], "response": sampled.responses[j],
             "fluency": float(sampled.fluency[j]), "fluency_term": float(scored.fluency_term[j]),
             "safety_probs": scored.safety_probs[j].tolist(), "prosociality": float(scored.prosociality[j]),
             "agreement": float(scored.agreement[j]) if scored.agreement is not None else None,
             "score": float(verdict.score[j]), "rank": int(verdict.rank[j]), "selected": bool(verdict.selected[j])}
            for j in range(k)]
    return sorted(rows, key=lambda r: r["rank"])


def render(candidates: list[dict], config: GenerateConfig) -> str:
    """The chosen reply, its RoT, safety probabilities and RoT agreement, then one table row per
    candidate (with an `agree` column when agreement was scored)."""
    chosen = candidates[0]
    casual, caution, intervention = chosen["safety_probs"]
    how = "score = " + " + ".join(f"{weight:g} * {term}" for term, weight in term_weights(config).items())
    if not config.rerank:
        how = "re-ranking off: the first sample is chosen"
    scored = chosen["agreement"] is not None
    lines = [
        f"bot> {chosen['response'] or '(empty reply)'}",
        f"  RoT: {chosen['rot'] or '(none)'}",
        f"  safety: casual {casual:.3f} | needs_caution {caution:.3f} | needs_intervention {intervention:.3f}",
    ]
    if scored:
        lines.append(f"  RoT agreement: {chosen['agreement']:.3f}" + (
            " (1 - P(the reply disagrees with its RoT))" if chosen["rot"]
            else " (no RoT: the neutral fill, the mean over the candidates that have one, else 0.5)"))
    lines += [f"  candidates ({how}; fluency = per-token probability, logp = mean log-prob of the reply tokens"
              + ("; agree = RoT agreement" if scored else "") + "):",
              "      #   logp  fluency  prosocial" + ("  agree" if scored else "") + "   score  rank  reply"]
    for row in candidates:
        text = row["response"] or "(empty)"
        if row["rot"]:
            text = f"[{row['rot']}] {text}"
        text = text if len(text) <= 60 else text[:57] + "..."
        agree = f" {row['agreement']:>6.3f}" if scored else ""
        lines.append(f"  {'*' if row['selected'] else ' '} {row['candidate_index']:>3} {row['fluency']:>6.2f} "
                     f"{row['fluency_term']:>8.3f} {row['prosociality']:>10.3f}{agree} {row['score']:>7.3f} "
                     f"{row['rank']:>5}  {text}")
    return "\n".join(lines)


def chat_loop(dm: DialogModel, scorer: SafetyScorer, config: GenerateConfig, read: TextIO,
              echo: Callable[..., None], agreement_scorer: AgreementScorer | None = None) -> int:
    """Answer every line of `read` until end of input or `/quit`; `echo(text, nl=True)` prints.
    Returns the number of replies."""
    history: list[str] = []
    echo(f"Chatting with {dm.path} (k={config.k}). Type {QUIT} or end the input (Ctrl-D) to stop.")
    interactive = read.isatty()
    turn = 0
    while True:
        echo("you> ", nl=False)
        line = read.readline()
        if not interactive:  # piped or scripted input: show it, so the transcript reads as a dialogue
            echo(line.rstrip("\n"))
        if not line or line.strip() == QUIT:
            break
        text = line.strip()
        if not text:
            continue
        history.append(text)
        candidates = reply(dm, scorer, history, config, turn, agreement_scorer)
        history.append(candidates[0]["response"])
        echo(render(candidates, config))
        turn += 1
    echo("bye.")
    return turn
