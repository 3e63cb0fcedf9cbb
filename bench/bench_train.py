"""Benchmark of the training loop against a plain Hugging Face `Trainer`, in one run, on the same
synthetic groups and the same tiny GPT-2 (the size of the default scratch base model), on CPU:

    (a) our loop with contrastive_weight = 0: positives only (cross-entropy),
    (b) our loop with the n-pair term, n = 4 (a positive and 3 negatives per group),
    (c) `transformers.Trainer` fine-tuning the same model with cross-entropy on the same positives,
    (w) (b) with each candidate read whole (`source <|bot|> target` per candidate, as before each source
        was read once and its key/value cache shared by its candidates): the baseline of that change.

Prints tokens per second (every real token the forward pass reads: source, `<|bot|>` and target),
the ratio a / c (goal: at least 1), and for (b) the time per scored target token relative to (a)
(goal: at most 1, i.e. the n-pair term costs no more than the extra tokens it scores). Each variant
runs `ROUNDS` times, interleaved, and the fastest round counts, which damps a shared machine's noise.
Timing covers the optimizer steps only (no model building, no validation).

    python -m bench bench_train        (or python -m bench.bench_train)

On the real-data experiment's model and data instead (issue 13): `BENCH_MODEL` names a model folder
(the experiment's `models/base`) and `BENCH_GROUPS` a groups file (its
`data/groups/stage1/train.parquet`); the first groups of that file are used, and the model is trained
from its saved weights.

    BENCH_MODEL=models/base BENCH_GROUPS=data/groups/stage1/train.parquet python -m bench bench_train
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import TrainConfig, TrainStage1Config
from pipeline.modeling import DialogModel, train_tokenizer
from pipeline.schemas import GROUPS
from pipeline import scoring
from pipeline.stages import train

GROUPS_PER_RUN, NEGATIVES, EPOCHS, ROUNDS = 64, 3, 2, 3
CONFIG = TrainConfig(batch_groups=8, warmup_steps=2, eval_batch_groups=32)
STAGE = TrainStage1Config(epochs=EPOCHS, learning_rate=1e-3)
WORDS = ("i you we they it is was not should never always friend family work money help hurt steal lie "
         "honest kind mean angry sad happy sorry please thanks today tomorrow school boss brother sister "
         "car dog home party game food fair wrong right people feel think want need know").split()


def sentence(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))) + "."


def synthetic_groups(n: int, seed: int) -> pa.Table:
    """`n` groups: two context turns, one RoT, a positive and NEGATIVES negatives of random words."""
    rng = np.random.default_rng(seed)
    rows = [{
        "group_id": f"g{i}", "corpus": "bench", "split": "train", "dialogue_id": str(i), "turn_index": 1,
        "context": [sentence(rng, 8, 20), sentence(rng, 8, 20)], "persona": [], "emotion": None,
        "safety_label": None, "positive": sentence(rng, 6, 16), "rots": [sentence(rng, 5, 10)],
        "negatives": [{"text": sentence(rng, 6, 16), "source": "random", "severity": float(rng.random())}
                      for _ in range(NEGATIVES)],
    } for i in range(n)]
    return pa.Table.from_pylist(rows, schema=GROUPS)


def tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_inner=512,
                                      n_positions=512, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))


def our_loop(model, tokenizer, groups, validation, config, stage=STAGE) -> dict:
    dm = DialogModel(copy.deepcopy(model), tokenizer, is_seq2seq=False)
    result = train.fit(dm, groups, validation, config, stage, train.make_accelerator(config), desc="loop")
    return result["timing"]


def hf_trainer(model, tokenizer, groups, scratch: Path, config=CONFIG, stage=STAGE) -> dict:
    """Cross-entropy on `prompt target</s>` with the prompt masked out of the labels: what a user would
    write with `Trainer` for the positives alone (with `config.lora`'s adapters when enabled, as
    `train.fit` adds them)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pipeline.finetune import add_lora

    examples = []
    for prompt, targets in zip(groups.prompt_ids, groups.target_ids):
        examples.append({"input_ids": prompt + targets[0], "labels": [-100] * len(prompt) + targets[0]})
    tokens = sum(len(e["input_ids"]) for e in examples) * stage.epochs

    def collate(batch):
        width = max(len(e["input_ids"]) for e in batch)
        pad = lambda row, value: row + [value] * (width - len(row))  # noqa: E731
        return {"input_ids": torch.tensor([pad(e["input_ids"], tokenizer.pad_token_id) for e in batch]),
                "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in batch]),
                "labels": torch.tensor([pad(e["labels"], -100) for e in batch])}

    class Clock(TrainerCallback):
        """From the first step's start to the last step's end, as our loop is timed."""

        started = None

        def on_step_begin(self, *args, **kwargs):
            self.started = self.started or time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds = time.perf_counter() - self.started

    clock = Clock()
    args = TrainingArguments(output_dir=str(scratch), per_device_train_batch_size=config.batch_groups,
                             num_train_epochs=stage.epochs, learning_rate=stage.learning_rate, warmup_steps=config.warmup_steps,
                             weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, seed=config.seed)
    fresh = copy.deepcopy(model)
    trainer = Trainer(model=add_lora(fresh, config.lora) if config.lora.enabled else fresh, args=args,
                      train_dataset=examples, data_collator=collate, callbacks=[clock])
    trainer.train()
    return {"train_seconds": clock.seconds, "read_tokens": tokens, "scored_tokens": None}


@contextlib.contextmanager
def each_candidate_read_whole():
    """`scoring.token_logprobs` as it was before the prompt was shared: the prompt repeated for each of
    its candidates, one `prompt target` row per candidate."""
    from pipeline import modeling

    def whole(dm, prompt_ids, target_ids, candidates_per_source=1):
        repeated = [ids for ids in prompt_ids for _ in range(candidates_per_source)]
        return modeling.token_logprobs(dm, repeated, target_ids, 1)

    shared, scoring.token_logprobs = scoring.token_logprobs, whole
    try:
        yield
    finally:
        scoring.token_logprobs = shared


def read_whole(measure):
    """`measure()` under `each_candidate_read_whole`; its tokens read are not counted (the loop counts a
    shared source once)."""
    with each_candidate_read_whole():
        return {**measure(), "read_tokens": None}


def main() -> None:
    # One intra-op thread for all three: a tiny model gains nothing from more, and on a shared
    # machine spinning threads make the timings swing several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measure_all()
    finally:
        torch.set_num_threads(threads)


def measure_all() -> None:
    import os

    torch.manual_seed(0)
    if os.environ.get("BENCH_GROUPS"):
        import pyarrow.parquet as pq

        table = pq.read_table(os.environ["BENCH_GROUPS"]).select(GROUPS.names).slice(0, GROUPS_PER_RUN + 8)
    else:
        table = synthetic_groups(GROUPS_PER_RUN + 8, seed=0)
    if os.environ.get("BENCH_MODEL"):
        from pipeline.modeling import load_dialog_model

        loaded = load_dialog_model(os.environ["BENCH_MODEL"])
        tokenizer, model = loaded.tokenizer, loaded.model
        print(f"model {os.environ['BENCH_MODEL']}, groups {os.environ.get('BENCH_GROUPS', 'synthetic')}")
    else:
        texts = [t for row in table.to_pylist() for t in row["context"] + [row["positive"]] + row["rots"]]
        tokenizer = train_tokenizer(texts, vocab_size=1000)
        model = tiny_gpt2(tokenizer)
    encoder = DialogModel(model, tokenizer, is_seq2seq=False)
    groups = scoring.encode_groups(encoder, table.slice(0, GROUPS_PER_RUN), CONFIG)
    validation = scoring.encode_groups(encoder, table.slice(GROUPS_PER_RUN), CONFIG)
    ce_only, npair = dataclasses.replace(CONFIG, contrastive_weight=0.0), dataclasses.replace(CONFIG, contrastive_weight=1.0)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(ROUNDS):
            for name, measure in (("a", lambda: our_loop(model, tokenizer, groups, validation, ce_only)),
                                  ("b", lambda: our_loop(model, tokenizer, groups, validation, npair)),
                                  ("w", lambda: read_whole(lambda: our_loop(model, tokenizer, groups, validation, npair))),
                                  ("c", lambda: hf_trainer(model, tokenizer, groups, Path(scratch)))):
                timing = measure()
                if name not in best or timing["train_seconds"] < best[name]["train_seconds"]:
                    best[name] = timing
    a, b = best["a"], best["b"]
    speed = {k: v["read_tokens"] / v["train_seconds"] for k, v in best.items() if v["read_tokens"]}
    print(f"GPT-2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {GROUPS_PER_RUN} groups "
          f"of 1 + {groups.negatives}, batch {CONFIG.batch_groups} groups, {EPOCHS} epoch(s), "
          f"{torch.get_num_threads()} CPU thread, best of {ROUNDS}")
    print(f"{'':32} {'seconds':>8} {'tokens read':>12} {'tokens/s':>9}")
    for key, label in (("a", "(a) ours, lambda = 0"), ("b", "(b) ours, n-pair, n = 4"),
                       ("w", "(w) (b), each candidate read whole"), ("c", "(c) HF Trainer, CE")):
        read = best[key]["read_tokens"]
        print(f"{label:32} {best[key]['train_seconds']:8.2f} {read if read else '–':>12} "
              f"{f'{speed[key]:.0f}' if key in speed else '–':>9}")
    print(f"a / c tokens/s ratio: {speed['a'] / speed['c']:.2f}  (goal >= 1)")
    per_token_a = a["train_seconds"] / a["scored_tokens"]
    per_token_b = b["train_seconds"] / b["scored_tokens"]
    print(f"(b) scores {b['scored_tokens'] / a['scored_tokens']:.2f}x the target tokens of (a) in "
          f"{b['train_seconds'] / a['train_seconds']:.2f}x the time: time per scored token b / a = "
          f"{per_token_b / per_token_a:.2f}  (goal <= 1)")
    print(f"(w) / (b) time: {best['w']['train_seconds'] / b['train_seconds']:.2f}x  (reading each source once "
          f"instead of once per candidate; (w) per scored token / a = "
          f"{best['w']['train_seconds'] / best['w']['scored_tokens'] / per_token_a:.2f})")


if __name__ == "__main__":
    main()
