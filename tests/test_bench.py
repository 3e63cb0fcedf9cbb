"""The 135M model's benchmark (bench/bench_smollm2.py): its FLOP count by kind, on a tiny chat model built
from a config; the whole benchmark end to end is a slow test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import TrainLoraConfig
from pipeline.finetune import add_lora
from pipeline.modeling import load_dialog_model

from bench.bench_smollm2 import flops_by_kind

LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]


def counted(model_dir, rank: int, tokens: torch.Tensor):
    model = add_lora(load_dialog_model(model_dir).model, TrainLoraConfig(enabled=True, r=rank, alpha=2 * rank,
                                                                         dropout=0.0, target_modules=LORA))
    with flops_by_kind(model.config.vocab_size, rank) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    return model.config, counter


def test_flops_are_split_by_kind_and_add_up_to_torchs_count(tiny_chat_model_dir):
    tokens = torch.randint(0, 50, (2, 11))
    config, counter = counted(tiny_chat_model_dir, 3, tokens)
    kinds = counter.kinds
    assert sum(kinds.values()) == counter.get_total_flops() > 0
    # the frozen output layer: logits (2 T d V) and their input gradient (2 T d V), no weight gradient
    assert kinds["output layer"] == 4 * tokens.numel() * config.hidden_size * config.vocab_size
    assert kinds["attention"] > 0  # the CPU attention kernel, which torch's registry leaves out
    # LoRA: x A (2 T d r), (x A) B (2 T r o), each with an input and a weight gradient: linear in r
    _, doubled = counted(tiny_chat_model_dir, 6, tokens)
    assert doubled.kinds["lora"] == 2 * kinds["lora"]
    assert doubled.kinds["dense"] == kinds["dense"] and doubled.kinds["output layer"] == kinds["output layer"]


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_a_tiny_chat_model(tiny_chat_model_dir, repo_root):
    env = {**os.environ, "BENCH_MODEL": str(tiny_chat_model_dir), "BENCH_ROUNDS": "1", "BENCH_THREADS": "1",
           "BENCH_GROUPS_N": "8", "BENCH_CONTEXTS_N": "2", "BENCH_GROUPS": "", "BENCH_CONTEXTS": "",
           "BENCH_JUDGE": ""}
    out = subprocess.run([sys.executable, "-m", "bench", "smollm2"], cwd=repo_root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("(peak) float32 torch.mm", "(a) ours, cross-entropy", "(b) ours, n-pair", "(c) HF Trainer, CE",
                 "a / c tokens/s", "b / a time per scored token", "batched vs one at a time",
                 "peak memory train_npair"):
        assert line in out.stdout, line
    assert " a batched call" in out.stdout and "profile: one call" not in out.stdout
    # BENCH_PARTS=sample,profile: the sampling arms alone, then the profile of one batched call (BENCH_BATCH's)
    out = subprocess.run([sys.executable, "-m", "bench", "smollm2"], cwd=repo_root,
                         env={**env, "BENCH_PARTS": "sample,profile", "BENCH_BATCH": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batched vs one at a time" in out.stdout and "plain generate / ours" in out.stdout
    assert "(a) ours, cross-entropy" not in out.stdout and "peak memory" not in out.stdout
    assert "1 a batched call" in out.stdout and "profile: one call of 1 contexts" in out.stdout
    assert "aten::mm" in out.stdout
    assert "drawing the next token of 4 rows, over the" in out.stdout and "Nucleus.draw" in out.stdout


@pytest.mark.slow
def test_the_gpu_check_runs_its_benches_on_the_cpu_when_asked(tiny_chat_model_dir, repo_root, tmp_path):
    """The GPU check's code path, on the CPU (`GPU_CHECK_ON_CPU=1`), from a folder without weights (random
    weights from its config, as on a lent machine the weights do not travel to)."""
    import shutil

    folder = tmp_path / "config_only"
    folder.mkdir()
    for path in tiny_chat_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    env = {**os.environ, "GPU_CHECK_ON_CPU": "1", "BENCH_MODEL": str(folder), "BENCH_ROUNDS": "1",
           "BENCH_GROUPS_N": "8", "BENCH_CONTEXTS_N": "2"}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=repo_root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(random weights" in out.stdout and "[cpu] (b) ours, n-pair" in out.stdout
    assert "[cpu] sampling: one context at a time" in out.stdout


def test_a_batched_product_over_the_vocabulary_is_the_output_layer_not_attention():
    with flops_by_kind(vocab=97, rank=3) as counter:
        torch.bmm(torch.randn(2, 5, 8), torch.randn(2, 8, 97))  # logits of target positions, batched
        torch.bmm(torch.randn(2, 5, 8), torch.randn(2, 8, 5))  # attention scores, eager
    assert counter.kinds["output layer"] == 2 * 2 * 5 * 8 * 97 and counter.kinds["attention"] == 2 * 2 * 5 * 8 * 5
