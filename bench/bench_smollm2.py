"""Benchmark of the 135M pretrained model (SmolLM2-135M-Instruct, trained with LoRA as params.real.yaml
trains it) against this machine's limits and against plain Hugging Face code, in one run (issue 22):

    (peak) the machine's float32 matrix-product speed: `torch.mm` of two 2048 x 2048 matrices at the
           bench's thread count, FLOP/s = 2 n^3 / seconds;
    (a)    our training loop, cross-entropy only (`train.contrastive_weight = 0`), LoRA as the preset;
    (b)    our loop with the n-pair term (a positive and its negatives, each context read once);
    (c)    `transformers.Trainer`, cross-entropy on the same positives, the same LoRA configuration;
    (g1)   sampling `generate.k` candidates one context at a time (`sampling.sample_candidates`);
    (gb)   the same contexts `generate.batch_size` at a time (what the generate stage does);
    (gh)   a plain `model.generate` call per batch with the same settings and seed, no log-probabilities;
    (j)    the `hf` judge on the encoder (all-MiniLM-L6-v2, when `BENCH_JUDGE` names it): (reply, context)
           pairs per second batched against one call per pair;
    (mem)  peak resident memory of training (a, b), sampling (gb) and judging (j), each in a fresh
           process, beside the memory of the loaded model alone.

FLOPs are counted, not estimated: each training step of (a) and (b) runs once more under
`torch.utils.flop_counter.FlopCounterMode` (forward and backward, every matrix product the CPU executes,
padding included), outside the timed runs; the same groups and seed give the same steps. The count is
split by the operands' shapes (`flops_by_kind`): the frozen dense layers (forward and input gradients:
no weight gradients, they are frozen), the LoRA adapters (forward, input and weight gradients), the
output layer (a 49k vocabulary) and attention. The achieved FLOP/s of a loop is its counted FLOPs over its
training seconds, and its share of (peak) is the figure to compare with the goal (at least 50%).

Every variant runs `BENCH_ROUNDS` times (3), interleaved; the median and the range are printed.

    python -m bench smollm2        (or python -m bench.bench_smollm2)

Inputs (environment): `BENCH_MODEL`, the model folder (default: the experiment's
`models/pretrained/smollm2`, made by `dvc repro pretrained@smollm2` with params.real.yaml; without it
the benchmark says so and stops); `BENCH_GROUPS`, a stage-1 groups file (default
`data/groups/stage1/train.parquet` when present, else synthetic groups); `BENCH_CONTEXTS`, a normalized
split (default `data/normalized/diasafety/test.parquet` when present, else synthetic contexts);
`BENCH_JUDGE`, an encoder folder (default `models/pretrained/minilm` when present; else (j) is skipped);
`BENCH_THREADS` (2), `BENCH_GROUPS_N` (16 groups: two steps of 8), `BENCH_CONTEXTS_N` (16),
`BENCH_BATCH` (contexts per batched sampling call; the preset's `generate.batch_size`, 8);
`BENCH_PARTS`, which parts to run (default `train,sample,judge,memory`: `BENCH_PARTS=sample` times the
sampling arms alone, a few minutes; `profile` adds `torch.profiler`'s table of one batched sampling call,
the operators by their own CPU time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import bench_generate, bench_judge, bench_train
from bench.bench_mine import peak_memory_mb
from pipeline.config import GenerateConfig, TrainConfig, load_all
from pipeline.modeling import DialogModel, Source
from pipeline.schemas import GROUPS
from pipeline.stages import train

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "params.real.yaml"


def setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def first_present(variable: str, default: str) -> Path | None:
    """The path `variable` names, else `default` when it exists, else None."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    return Path(default) if Path(default).exists() else None


def spread(values: list[float]) -> str:
    """`median (min–max)` of a list of figures."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


# --- the machine's limit -----------------------------------------------------------------------------


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 `torch.mm` of two n x n matrices at torch's current thread count (median of
    `repeats` after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
    return 2 * n ** 3 / statistics.median(seconds)


# --- counting FLOPs ----------------------------------------------------------------------------------


def flops_by_kind(vocab: int, rank: int):
    """A `FlopCounterMode` that also files each counted product under a kind, by its operands' shapes:
    `output layer` (a dimension equal to the vocabulary), `lora` (a dimension equal to the LoRA rank:
    the adapters' forward, input-gradient and weight-gradient products), `dense` (any other `mm`/`addmm`:
    the frozen layers' forward and input gradients) and `attention` (the attention kernel, forward and
    backward, or its batched products)."""
    from collections import Counter

    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    forward._get_raw = backward._get_raw = True  # called with the tensors, as torch's registry does
    aten = torch.ops.aten
    # The CPU kernel of scaled_dot_product_attention is not in torch's registry: counted as on a GPU.
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}

    class ByKind(FlopCounterMode):
        def __init__(self):
            super().__init__(display=False, custom_mapping=cpu_attention)
            self.kinds: Counter = Counter()

        def _count_flops(self, func_packet, out, args, kwargs):  # torch's hook for each counted op
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                dims = {d for a in args if isinstance(a, torch.Tensor) for d in a.shape[-2:]}
                name = str(func_packet).rsplit(".", 1)[-1]
                kind = ("output layer" if vocab in dims else "attention" if "attention" in name or name == "bmm"
                        else "lora" if rank in dims else "dense")
                self.kinds[kind] += flops
            return super()._count_flops(func_packet, out, args, kwargs)

    return ByKind()


def counted_loop(model, tokenizer, groups, validation, config: TrainConfig, stage) -> dict[str, int]:
    """FLOPs by kind (`flops_by_kind`) of every training step of `bench_train.our_loop`, validation
    not counted."""
    step, total = train.train_step, {}

    def counted(*args, **kwargs):
        with flops_by_kind(model.config.vocab_size, config.lora.r) as counter:
            metrics = step(*args, **kwargs)
        assert sum(counter.kinds.values()) == counter.get_total_flops()
        for kind, flops in counter.kinds.items():
            total[kind] = total.get(kind, 0) + flops
        return metrics

    train.train_step = counted
    try:
        bench_train.our_loop(model, tokenizer, groups, validation, config, stage)
    finally:
        train.train_step = step
    return total


# --- sampling ----------------------------------------------------------------------------------------


def plain_generate(dm: DialogModel, sources: list[Source], config: GenerateConfig, batch_size: int) -> tuple[float, int]:
    """Seconds and generated tokens of one plain `model.generate` call per batch (the stage's prompts,
    left-padded; the same sampling settings and seeds as `bench_generate.timed`; no log-probabilities)."""
    from pipeline.sampling import _pad, encode_prompts, pad_id

    eos, tokens, started = dm.tokenizer.eos_token_id, 0, time.perf_counter()
    for index, start in enumerate(range(0, len(sources), batch_size)):
        prompts = encode_prompts(dm, sources[start: start + batch_size], config)
        input_ids, attention = _pad(prompts, pad_id(dm.tokenizer), left=True)
        torch.manual_seed(index)
        with torch.no_grad():
            out = dm.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=config.do_sample,
                                    temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None,
                                    max_new_tokens=config.max_new_tokens, num_return_sequences=config.k,
                                    pad_token_id=pad_id(dm.tokenizer), eos_token_id=eos)
        for row in out[:, input_ids.shape[1]:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return time.perf_counter() - started, tokens


# --- inputs ------------------------------------------------------------------------------------------


def inputs(model_path: Path):
    """(dm, train config, stage config, generate config, encoded groups, validation groups, sources)."""
    import pyarrow.parquet as pq

    from pipeline.modeling import load_dialog_model
    from pipeline.scoring import encode_groups

    sections = load_all(PRESET)
    config, stage, generate = sections["train"], sections["train_stage1"], sections["generate"]
    stage = dataclasses.replace(stage, epochs=1)
    dm = load_dialog_model(model_path)
    n = int(setting("BENCH_GROUPS_N", "16"))
    groups_file = first_present("BENCH_GROUPS", "data/groups/stage1/train.parquet")
    if groups_file is not None:
        table = pq.read_table(groups_file).select(GROUPS.names).slice(0, n + 4)
    else:
        table = bench_train.synthetic_groups(n + 4, seed=0)
    groups, validation = encode_groups(dm, table.slice(0, n), config), encode_groups(dm, table.slice(n), config)
    m = int(setting("BENCH_CONTEXTS_N", "16"))
    contexts_file = first_present("BENCH_CONTEXTS", "data/normalized/diasafety/test.parquet")
    if contexts_file is not None:
        rows = pq.read_table(contexts_file, columns=["context"]).slice(0, m).to_pylist()
        sources = [Source(row["context"]) for row in rows]
    else:
        sources = bench_generate.contexts(m)
    return dm, config, stage, generate, groups, validation, sources, (groups_file, contexts_file)


def judge_pairs(count: int) -> tuple[list[str], list[list[str]], "np.ndarray"]:
    import numpy as np

    sources = bench_generate.contexts(count)
    replies = [" ".join(s.context[-1].split()[::-1]) for s in sources]
    return replies, [list(s.context) for s in sources], np.arange(count) % 2


def fit_judge(encoder: Path):
    """The `hf` judge of params.real.yaml's settings on `encoder`, fitted one epoch on 64 pairs (its
    speed, not its quality, is measured)."""
    import numpy as np

    from pipeline.safety_models import JudgeScorer

    section = load_all(PRESET)["judge"]
    config = dataclasses.replace(section, model="hf", hf=dataclasses.replace(section.hf, name=str(encoder), epochs=1))
    replies, contexts, labels = judge_pairs(64)
    return JudgeScorer.fit(config, [replies], contexts, labels, np.ones(len(labels)))


# --- peak memory, one piece per process ----------------------------------------------------------------


def piece(name: str, model_path: Path) -> dict:
    """Run one piece once in this (fresh) process; its peak resident memory before and after the work."""
    torch.set_num_threads(int(setting("BENCH_THREADS", "2")))
    if name == "judge":
        judge = fit_judge(Path(os.environ["BENCH_JUDGE_PATH"]))
        loaded = peak_memory_mb()  # VmHWM only grows: the peak so far, with the judge fitted
        replies, contexts, _ = judge_pairs(256)
        judge.predict_unsafe(replies, contexts)
        return {"loaded_mb": loaded, "peak_mb": peak_memory_mb()}
    dm, config, stage, generate, groups, validation, sources, _ = inputs(model_path)
    loaded = peak_memory_mb()
    if name in ("train_ce", "train_npair"):
        weight = 0.0 if name == "train_ce" else 1.0
        bench_train.our_loop(dm.model, dm.tokenizer, groups, validation,
                             dataclasses.replace(config, contrastive_weight=weight), stage)
    else:
        bench_generate.timed(dm, sources, generate.batch_size, generate)
    return {"loaded_mb": loaded, "peak_mb": peak_memory_mb()}


def memory(model_path: Path, judge_path: Path | None) -> dict[str, dict]:
    names = ["train_ce", "train_npair", "sample"] + (["judge"] if judge_path else [])
    env = {**os.environ, "BENCH_JUDGE_PATH": str(judge_path or "")}
    found = {}
    for name in names:
        out = subprocess.run([sys.executable, "-m", "bench.bench_smollm2", "--piece", name, str(model_path)],
                             capture_output=True, text=True, env=env, cwd=os.getcwd())
        if out.returncode != 0:
            raise RuntimeError(f"bench_smollm2 --piece {name} failed: {out.stderr.strip().splitlines()[-1:]}")
        found[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


# --- the benchmark -------------------------------------------------------------------------------------


def main() -> dict | None:
    model_path = first_present("BENCH_MODEL", "models/pretrained/smollm2")
    if model_path is None:
        print("bench_smollm2: no models/pretrained/smollm2 here and no BENCH_MODEL; run "
              "`dvc repro pretrained@smollm2` with params.real.yaml as params.yaml, or name a folder. Skipped")
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(int(setting("BENCH_THREADS", "2")))
    try:
        return measure_all(model_path)
    finally:
        torch.set_num_threads(threads)


def measure_all(model_path: Path) -> dict:
    rounds = int(setting("BENCH_ROUNDS", "3"))
    dm, config, stage, generate, groups, validation, sources, files = inputs(model_path)
    generate = dataclasses.replace(generate, batch_size=int(setting("BENCH_BATCH", str(generate.batch_size))))
    judge_path = first_present("BENCH_JUDGE", "models/pretrained/minilm")
    ce, npair = dataclasses.replace(config, contrastive_weight=0.0), dataclasses.replace(config, contrastive_weight=1.0)
    parameters = sum(p.numel() for p in dm.model.parameters())
    print(f"model {model_path} ({parameters / 1e6:.1f}M parameters), LoRA r {config.lora.r} on "
          f"{', '.join(config.lora.target_modules)}; groups {files[0] or 'synthetic'} ({len(groups)} of 1 + "
          f"{groups.negatives}, batch {config.batch_groups}); contexts {files[1] or 'synthetic'} ({len(sources)}, "
          f"k {generate.k}, up to {generate.max_new_tokens} new tokens, {generate.batch_size} a batched call); "
          f"{torch.get_num_threads()} threads; "
          f"{rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f} at the start")

    parts = set(setting("BENCH_PARTS", "train,sample,judge,memory").split(","))
    flops = {}
    if "train" in parts:
        flops = {"a": counted_loop(dm.model, dm.tokenizer, groups, validation, ce, stage),
                 "b": counted_loop(dm.model, dm.tokenizer, groups, validation, npair, stage)}
    judge = fit_judge(judge_path) if judge_path and "judge" in parts else None
    replies, contexts, _ = judge_pairs(256)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        arms = {}
        if "train" in parts:
            arms.update({
                "peak": lambda: {"flops": matmul_peak()},
                "a": lambda: bench_train.our_loop(dm.model, dm.tokenizer, groups, validation, ce, stage),
                "b": lambda: bench_train.our_loop(dm.model, dm.tokenizer, groups, validation, npair, stage),
                "c": lambda: bench_train.hf_trainer(dm.model, dm.tokenizer, groups, Path(scratch), config, stage),
            })
        if "sample" in parts:
            arms.update({
                "g1": lambda: dict(zip(("seconds", "tokens"), bench_generate.timed(dm, sources, 1, generate))),
                "gb": lambda: dict(zip(("seconds", "tokens"), bench_generate.timed(dm, sources, generate.batch_size,
                                                                                  generate))),
                "gh": lambda: dict(zip(("seconds", "tokens"), plain_generate(dm, sources, generate,
                                                                             generate.batch_size))),
            })
        if judge is not None:
            # one call per pair over 32 of them: the encoder is slow one pair at a time
            arms["j"] = lambda: dict(zip(("batched", "single"), bench_judge.throughput(judge, replies, contexts, 32)))
        for index in range(rounds):
            for name, measure in arms.items():
                runs.setdefault(name, []).append(measure())
            print(f"  round {index + 1} of {rounds} done")
    mem = memory(model_path, judge_path) if "memory" in parts else {}
    if "profile" in parts:
        profile_sampling(dm, sources[: generate.batch_size], generate)
    return report(runs, flops, mem)


def profile_sampling(dm: DialogModel, sources: list[Source], generate: GenerateConfig) -> None:
    """`torch.profiler`'s operators of one batched sampling call (the stage's), by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    bench_generate.timed(dm, sources[:2], 2, generate)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, tokens = bench_generate.timed(dm, sources, len(sources), generate)
    print(f"profile: one call of {len(sources)} contexts x {generate.k}, {seconds:.1f} s under the profiler, "
          f"{tokens} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    sampler_costs(dm, sources, generate)


def sampler_costs(dm: DialogModel, sources: list[Source], generate: GenerateConfig, repeats: int = 3) -> dict:
    """Milliseconds per step to draw the next token of a batched call's rows (its contexts x k) from the
    raw logits of every step of one such call: transformers' filters (`TopPLogitsWarper` etc.) then
    `multinomial` over the whole vocabulary, as `generate` samples, against `Nucleus.draw`; the median of
    `repeats` passes over the steps."""
    from transformers import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from pipeline.nucleus import Nucleus
    from pipeline.sampling import (
        _pad, encode_prompts, expanded_inputs, generation_settings, neutral_generation_defaults, pad_id,
    )

    input_ids, attention = _pad(encode_prompts(dm, sources, generate), pad_id(dm.tokenizer), left=True)
    decoding, sampler = generation_settings(dm, generate)
    torch.manual_seed(0)
    with torch.no_grad(), neutral_generation_defaults(dm.model):
        steps = dm.model.generate(**expanded_inputs(dm, input_ids, attention, generate.k), logits_processor=sampler,
                                  generation_config=GenerationConfig(**decoding, return_dict_in_generate=True,
                                                                     output_logits=True)).logits
    steps = [step.float() for step in steps]
    warpers = ([TemperatureLogitsWarper(generate.temperature)] if generate.temperature != 1.0 else []) + \
        ([TopKLogitsWarper(generate.top_k)] if generate.top_k else []) + \
        ([TopPLogitsWarper(generate.top_p)] if generate.top_p < 1.0 else [])

    def transformers_draw(scores):
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(scores.softmax(dim=-1), 1)

    nucleus = Nucleus.of(generate)
    found = {}
    for name, draw in (("transformers", transformers_draw), ("ours", nucleus.draw)):
        passes = []
        for _ in range(repeats):
            started = time.perf_counter()
            for step in steps:
                draw(step)
            passes.append((time.perf_counter() - started) * 1000 / len(steps))
        found[name] = statistics.median(passes)
    print(f"drawing the next token of {steps[0].shape[0]} rows, over the {len(steps)} steps of one call: transformers' "
          f"filters and multinomial {found['transformers']:.1f} ms a step, Nucleus.draw {found['ours']:.1f} ms "
          f"(median of {repeats} passes)")
    return found


def report(runs: dict[str, list[dict]], flops: dict[str, dict], mem: dict[str, dict]) -> dict:
    """Print the figures (median and range over rounds) and return them: the parts that ran."""
    results: dict[str, object] = {}
    if "peak" in runs:
        report_training(runs, flops, results)
    if "gb" in runs:
        report_sampling(runs, results)
    if "j" in runs:
        print(f"judge (hf, encoder): batched {spread([r['batched'] for r in runs['j']])} pairs/s, one call per pair "
              f"{spread([r['single'] for r in runs['j']])} pairs/s")
        results["judge"] = runs["j"]
    for name, figures in mem.items():
        print(f"peak memory {name}: {figures['peak_mb']:,.0f} MB (the loaded inputs alone {figures['loaded_mb']:,.0f} MB)")
    if mem:
        results["memory"] = mem
    return results


def report_training(runs: dict[str, list[dict]], flops: dict[str, dict], results: dict) -> None:
    """The machine's peak and the three training arms (a, b, c), into `results`."""
    peak = [r["flops"] for r in runs["peak"]]
    print(f"(peak) float32 torch.mm 2048^2: {spread([p / 1e9 for p in peak])} GFLOP/s")
    results["peak_gflops"] = statistics.median(peak) / 1e9
    print(f"{'':28} {'seconds':>20} {'tokens/s':>20} {'GFLOP/s':>20} {'share of peak':>20}")
    for key, label in (("a", "(a) ours, cross-entropy"), ("b", "(b) ours, n-pair"), ("c", "(c) HF Trainer, CE")):
        seconds = [r["train_seconds"] for r in runs[key]]
        speed = [r["read_tokens"] / s for r, s in zip(runs[key], seconds)]
        achieved = [sum(flops[key].values()) / s / 1e9 for s in seconds] if key in flops else None
        share = [g * 1e9 / p for g, p in zip(achieved, peak)] if achieved else None
        print(f"{label:28} {spread(seconds):>20} {spread(speed):>20} {spread(achieved) if achieved else '–':>20} "
              f"{spread(share) if share else '–':>20}")
        results[key] = {"seconds": seconds, "tokens_per_s": speed, "gflops": achieved, "share_of_peak": share}
    for key in ("a", "b"):
        total = sum(flops[key].values())
        parts = ", ".join(f"{kind} {value / total:.0%}" for kind, value in flops[key].items() if value)
        print(f"  {key}: {total / 1e9:.1f} GFLOP counted over its steps: {parts}")
        results[key]["flops"] = flops[key]
    ratio_ac = [ra["read_tokens"] / ra["train_seconds"] / (rc["read_tokens"] / rc["train_seconds"])
                for ra, rc in zip(runs["a"], runs["c"])]
    per_token = [(rb["train_seconds"] / rb["scored_tokens"]) / (ra["train_seconds"] / ra["scored_tokens"])
                 for ra, rb in zip(runs["a"], runs["b"])]
    print(f"a / c tokens/s, round by round: {spread(ratio_ac)}  (goal >= 1)")
    print(f"b / a time per scored token, round by round: {spread(per_token)}  (goal <= 1)")
    results.update(a_over_c=ratio_ac, b_over_a_per_token=per_token)


def report_sampling(runs: dict[str, list[dict]], results: dict) -> None:
    """The three sampling arms (g1, gb, gh), into `results`."""
    batched = [r1["seconds"] / rb["seconds"] for r1, rb in zip(runs["g1"], runs["gb"])]
    plain = [rh["seconds"] / rb["seconds"] for rh, rb in zip(runs["gh"], runs["gb"])]
    per_token = [(rh["seconds"] / rh["tokens"]) / (rb["seconds"] / rb["tokens"]) for rh, rb in zip(runs["gh"], runs["gb"])]
    print(f"sampling: one context at a time {spread([r['seconds'] for r in runs['g1']])} s, batched "
          f"{spread([r['seconds'] for r in runs['gb']])} s, plain generate {spread([r['seconds'] for r in runs['gh']])} s")
    print(f"  tokens: one at a time {spread([r['tokens'] for r in runs['g1']])}, batched "
          f"{spread([r['tokens'] for r in runs['gb']])}, plain generate {spread([r['tokens'] for r in runs['gh']])}")
    print(f"  batched vs one at a time: {spread(batched)}x (goal >= 5); plain generate / ours: {spread(plain)} "
          f"(goal >= 1), per generated token {spread(per_token)}")
    results.update(batched_speedup=batched, plain_over_ours=plain, plain_over_ours_per_token=per_token)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--piece":
        print(json.dumps(piece(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
