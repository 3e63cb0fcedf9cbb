"""GPU check of the 135M model (issue 22): `bench_smollm2`'s training and sampling benches on one GPU.

    python -m bench.gpu_check            # one GPU; on a machine without one it says so and exits 0

The model is SmolLM2-135M-Instruct's: the folder `BENCH_MODEL` (default `models/pretrained/smollm2`)
with its weights, or, where only its config and tokenizer files are there (the 517 MB of weights do not
travel to a lent GPU machine: carry `config.json`, `chat_template.jinja` and the `tokenizer*` files),
the same architecture built from its config with random weights; the work per step is what matters
here, not the text. The
groups are `bench_train.synthetic_groups` (or `BENCH_GROUPS`), the contexts `bench_generate.contexts`.

    (a) our training loop, cross-entropy only, LoRA as params.real.yaml; (b) the same with the n-pair
        term; `train.precision auto`: bf16 autocast on the card, float32 weights;
    (g1) sampling `generate.k` candidates one context at a time; (gb) `generate.batch_size` at a time.

Each figure is the median (and range) of `BENCH_ROUNDS` (3) interleaved rounds. FLOPs are counted as in
`bench_smollm2` (`flops_by_kind`: every product executed, forward and backward, padding included) and
model FLOPs utilisation is counted FLOPs / seconds / the card's dense bf16 peak of its data sheet (H100
and H200 SXM 989 TFLOP/s, A100 312). `nvidia-smi`'s card name is printed beside the figures. About two
minutes on one H100 with the default sizes.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench import bench_generate, bench_train
from bench.bench_smollm2 import PRESET, counted_loop, spread
from pipeline.config import load_all
from pipeline.modeling import DialogModel

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, data sheet (SXM)
GROUPS, CONTEXTS = 64, 64


def card_name() -> str:
    """`nvidia-smi`'s name of the first card, else torch's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def model_of(folder: Path) -> tuple[DialogModel, str]:
    """The model folder's weights, or its architecture with random weights when it has none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling import load_dialog_model

    if any(folder.glob("*.safetensors")):
        return load_dialog_model(folder), "its weights"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return DialogModel(model, tokenizer, is_seq2seq=False), "random weights"


def main() -> int:
    on_cpu = os.environ.get("GPU_CHECK_ON_CPU") == "1"  # the tests' smoke run of the same code
    if not torch.cuda.is_available() and not on_cpu:
        print("gpu_check: no CUDA GPU on this machine; this check measures the 135M model's training and "
              "sampling on a GPU and only runs there (nothing was measured).")
        return 0
    folder = Path(os.environ.get("BENCH_MODEL", "models/pretrained/smollm2"))
    if not (folder / "config.json").is_file():
        print(f"gpu_check: {folder} has no config.json; carry models/pretrained/smollm2's config.json, "
              "chat_template.jinja and tokenizer files (or set BENCH_MODEL). Nothing was measured.")
        return 1
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    groups_n = int(os.environ.get("BENCH_GROUPS_N", str(GROUPS)))
    contexts_n = int(os.environ.get("BENCH_CONTEXTS_N", str(CONTEXTS)))
    sections = load_all(PRESET)
    config, generate = sections["train"], sections["generate"]
    stage = dataclasses.replace(sections["train_stage1"], epochs=1)
    dm, weights = model_of(folder)
    from pipeline.scoring import encode_groups

    table = bench_train.synthetic_groups(groups_n + 4, seed=0)
    groups, validation = encode_groups(dm, table.slice(0, groups_n), config), encode_groups(dm, table.slice(groups_n), config)
    sources = bench_generate.contexts(contexts_n)
    name = card_name()
    ce, npair = dataclasses.replace(config, contrastive_weight=0.0), dataclasses.replace(config, contrastive_weight=1.0)
    print(f"gpu_check on {name}: {folder} ({weights}, {sum(p.numel() for p in dm.model.parameters()) / 1e6:.1f}M "
          f"parameters), LoRA r {config.lora.r}, {groups_n} synthetic groups of 1 + {groups.negatives}, batch "
          f"{config.batch_groups}; {contexts_n} contexts x k {generate.k}; {rounds} rounds")
    flops = {"a": sum(counted_loop(dm.model, dm.tokenizer, groups, validation, ce, stage).values()),
             "b": sum(counted_loop(dm.model, dm.tokenizer, groups, validation, npair, stage).values())}
    device = "cpu" if on_cpu else "cuda"
    sampler = DialogModel(dm.model.to(device).eval(), dm.tokenizer, is_seq2seq=False)
    runs: dict[str, list] = {}
    for _ in range(rounds):
        for key, config_k in (("a", ce), ("b", npair)):
            runs.setdefault(key, []).append(bench_train.our_loop(dm.model, dm.tokenizer, groups, validation, config_k, stage))
        for key, batch in (("g1", 1), ("gb", generate.batch_size)):
            runs.setdefault(key, []).append(bench_generate.timed(sampler, sources, batch, generate)[0])
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    for key, label in (("a", "(a) ours, cross-entropy"), ("b", "(b) ours, n-pair")):
        seconds = [r["train_seconds"] for r in runs[key]]
        speed = [r["read_tokens"] / s for r, s in zip(runs[key], seconds)]
        achieved = [flops[key] / s for s in seconds]
        mfu = f"MFU {spread([f / peak * 100 for f in achieved])}% of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: peak unknown"
        print(f"[{name}] {label}: {spread(seconds)} s, {spread(speed)} tokens/s, "
              f"{spread([f / 1e12 for f in achieved])} TFLOP/s counted; {mfu}")
    per_token = [(rb["train_seconds"] / rb["scored_tokens"]) / (ra["train_seconds"] / ra["scored_tokens"])
                 for ra, rb in zip(runs["a"], runs["b"])]
    print(f"[{name}] b / a time per scored token: {spread(per_token)} (goal <= 1)")
    speedup = [one / batched for one, batched in zip(runs["g1"], runs["gb"])]
    print(f"[{name}] sampling: one context at a time {spread(runs['g1'])} s, batched {spread(runs['gb'])} s: "
          f"{spread(speedup)}x (goal >= 5)")
    if not on_cpu:
        print(f"[{name}] peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"[{name}] median seconds of a round: {statistics.median([r['train_seconds'] for r in runs['b']]):.1f} (b)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
