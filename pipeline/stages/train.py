"""train: fine-tune the dialog model on n-pair groups with cross-entropy plus the socially aware
n-pair contrastive loss (`pipeline/losses.py`). One module, two DVC stages:

    python -m pipeline train --stage 1 --init models/base --groups data/groups/stage1 \\
        --out models/stage1 --checkpoints models/stage1_checkpoints --live reports/train/stage1
    python -m pipeline train --stage 2 --init models/stage1 --groups data/groups/stage2 \\
        --out models/stage2 --checkpoints models/stage2_checkpoints --live reports/train/stage2

Reads `<groups>/{train,validation}.parquet` (`schemas.GROUPS`) and the model folder `--init`
(save_pretrained format, a tokenizer with the dialog markers or a chat template: `modeling.DialogModel.format`);
groups are encoded and scored by `pipeline/scoring.py`. Writes `--out`: the model (safetensors), its tokenizer and `train.json`
(resolved config, git commit, library versions, data counts, final metrics; no timing, so equal runs
give equal bytes); `--live`: dvclive per-step and per-epoch metrics; `--checkpoints`: the latest
resumable checkpoint while the run is going (emptied when it ends).

The same command runs on a CPU, a GPU, or several GPUs (`train.processes`, DDP under `torchrun`:
process r takes micro-batches r, r + W, ... of the seeded epoch order; metrics are averaged across
processes). An interrupted run resumes from the last checkpoint (model, optimizer, scheduler, RNG
states, step and logged history) and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import devices
from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, staged_dir, write_json
from pipeline.config import TrainConfig, TrainStageConfig
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.faults import kill_point
from pipeline.finetune import add_lora
from pipeline.losses import cross_entropy, npair_loss, severity_margins, total_loss
from pipeline.modeling import DialogModel
from pipeline.scoring import (
    EncodedGroups, GroupScorer, encode_groups, load_init_model, per_group_scores, read_groups, score_batch,
    validation_metrics, validation_sums,
)

log = logging.getLogger(__name__)


# --- batches --------------------------------------------------------------------------------------


def epoch_batches(n_groups: int, batch_groups: int, seed: int, epoch: int, world_size: int = 1,
                  rank: int = 0) -> list[list[int]]:
    """This process's micro-batches of group indices for one epoch.

    The order is a permutation drawn from `(seed, epoch)` alone, so a resumed run replays it; micro-
    batch i goes to process `i % world_size`. With several processes, the last micro-batches that
    would leave some process without one are dropped, so every process takes the same number of steps.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_groups)
    batches = [order[i:i + batch_groups].tolist() for i in range(0, n_groups, batch_groups)]
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


# --- loss ----------------------------------------------------------------------------------------


def scored_candidates(groups: EncodedGroups, config: TrainConfig) -> int:
    """Candidates scored per group: the positive and its negatives, or the positive alone when
    `contrastive_weight = 0` (the CE-only ablation then costs what plain fine-tuning does)."""
    return 1 + groups.negatives if config.contrastive_weight > 0 else 1


def step_tokens(groups: EncodedGroups, chunk: list[list[int]], candidates: int) -> tuple[int, int]:
    """(tokens the forward passes read, target tokens they score) for one step's micro-batches, padding
    excluded."""
    batch = [g for micro in chunk for g in micro]
    target = sum(len(ids) for g in batch for ids in groups.target_ids[g][:candidates])
    prompt = sum(len(groups.prompt_ids[g]) for g in batch)
    # Each prompt is read once (`modeling.token_logprobs`); with C > 1 a causal model reads the prompt's
    # last token once per candidate in place of its target's last token.
    return prompt + target, target


def group_loss(scorer, groups: EncodedGroups, batch: list[int], config: TrainConfig):
    """The loss of a micro-batch and its detached statistics: `L = CE + lambda * L_npair` over the
    positive and its negatives, or CE alone over the positives when `contrastive_weight = 0`."""
    candidates = scored_candidates(groups, config)
    logps, mask, scores = score_batch(scorer, groups, batch, candidates, config.length_normalized)
    ce = cross_entropy(logps[:, 0], mask[:, 0])
    if candidates == 1:
        return ce, {"total": ce.detach(), "ce": ce.detach()}
    severity = groups.severity[batch].to(scores.device)  # (G, N)
    npair, diagnostics = npair_loss(scores[:, 0], scores[:, 1:], severity_margins(severity, config.margin), config.tau)
    loss = total_loss(ce, npair, config.contrastive_weight)
    return loss, {"total": loss.detach(), "ce": ce.detach(), "npair": npair.detach(), **diagnostics}


# --- checkpoints ----------------------------------------------------------------------------------


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step complete checkpoint in `folder` (a partial one has no checkpoint.json)."""
    done = sorted(p for p in Path(folder).glob("step-*") if (p / "checkpoint.json").is_file())
    return done[-1] if done else None


def clear_checkpoints(folder: Path) -> None:
    for path in Path(folder).glob("*step-*"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(folder: Path, accelerator, scorer, optimizer, scheduler, step: int, fingerprint: str,
                    history: list[dict]) -> None:
    """Write `<folder>/step-<step>` (built under a temporary name, renamed when complete) and remove
    older ones. Weights are safetensors; optimizer, scheduler and RNG states are plain tensors and
    numbers that `torch.load(weights_only=True)` reads back."""
    from safetensors.torch import save_model

    final, temp = folder / f"step-{step:08d}", folder / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, temp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(scorer), str(temp / "model.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        torch.save(state, temp / "state.pt")
        write_json({"step": step, "fingerprint": fingerprint, "history": history}, temp / "checkpoint.json")
        temp.rename(final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    kill_point("checkpoint")


def load_checkpoint(path: Path, accelerator, scorer, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore a checkpoint written by `save_checkpoint`; returns (step, history)."""
    from safetensors.torch import load_model

    record = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
    load_model(accelerator.unwrap_model(scorer), str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return record["step"], record["history"]


def run_fingerprint(stage: int, config: TrainConfig, stage_config: TrainStageConfig, init: Path, groups: Path,
                    world_size: int) -> str:
    """What a checkpoint must match to be resumed: config, process count, initial weights and data."""
    files = sorted(Path(init).glob("*.safetensors")) + [Path(groups) / f"{s}.parquet" for s in ("train", "validation")]
    record = {"stage": stage, "train": dataclasses.asdict(config), "stage_config": dataclasses.asdict(stage_config),
              "world_size": world_size, "files": {p.name if p.suffix == ".safetensors" else f"groups/{p.name}": sha256(p)
                                                   for p in files}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def resume(checkpoints: Path, fingerprint: str, accelerator, scorer, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore the latest checkpoint in `checkpoints` written by this same run (`fingerprint`) and
    return its (step, history); (0, []) when there is none. A checkpoint of another run is removed."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    found = latest_checkpoint(checkpoints)
    if found is not None and json.loads((found / "checkpoint.json").read_text())["fingerprint"] != fingerprint:
        log.warning("%s: ignoring a checkpoint of a different config, initial model or data", found)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            clear_checkpoints(checkpoints)
        found = None
    accelerator.wait_for_everyone()
    if found is None:
        return 0, []
    step, history = load_checkpoint(found, accelerator, scorer, optimizer, scheduler)
    log.info("resumed from %s (step %d)", found, step)
    return step, history


# --- training -------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    """An `accelerate.Accelerator` with the autocast precision `devices.resolve_precision` gives."""
    from accelerate import Accelerator

    precision = devices.resolve_precision(config.precision, "train.precision")
    # cpu=True without a GPU, so that `torchrun` on CPUs runs DDP over gloo.
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=devices.model_device() == "cpu")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


def log_metrics(history: list[dict], live, step: int, metrics: dict[str, float]) -> None:
    """Append `metrics` at `step` to the history (which checkpoints carry) and log them to dvclive."""
    history.append({"step": step, "metrics": metrics})
    if live is not None:
        log_live(live, step, metrics)


def log_live(live, step: int, metrics: dict[str, float]) -> None:
    live.step = step
    # In name order: a resumed run re-logs the history from checkpoint.json, whose keys are sorted, and
    # dvclive's summary keeps the order metrics first arrive in.
    for name, value in sorted(metrics.items()):
        live.log_metric(name, value)
    live.make_summary()


def train_step(accelerator, scorer, optimizer, scheduler, groups: EncodedGroups, chunk: list[list[int]],
               config: TrainConfig, *, step: int, epoch: int) -> dict[str, float]:
    """One optimizer step over the micro-batches `chunk`. Returns the loss statistics (weighted by
    groups, averaged across processes), the gradient norm before clipping and the learning rate; a
    loss that is not finite raises before the weights change."""
    step_groups = sum(len(b) for b in chunk)
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(chunk):
        # Gradients are all-reduced on the last micro-batch of the step only.
        sync = contextlib.nullcontext() if i == len(chunk) - 1 else accelerator.no_sync(scorer)
        with sync:
            loss, batch_stats = group_loss(scorer, groups, batch, config)
            accelerator.backward(loss * (len(batch) / step_groups))
        for name, value in batch_stats.items():
            stats[name] = stats.get(name, 0.0) + value.float() * (len(batch) / step_groups)
    names = sorted(stats)
    values = accelerator.reduce(torch.stack([stats[n] for n in names]).to(accelerator.device), "mean")
    metrics = dict(zip(names, values.tolist()))
    if not all(math.isfinite(v) for v in metrics.values()):
        shown = ", ".join(f"{n} = {metrics[n]:.4g}" for n in ("total", "ce", "npair") if n in metrics)
        raise PipelineError(f"training loss is not finite at step {step} (epoch {epoch + 1}; {shown}); "
                            "lower train_stage<k>.learning_rate, or use train.precision = fp32")
    if config.max_grad_norm > 0:
        metrics["grad_norm"] = float(accelerator.clip_grad_norm_(scorer.parameters(), config.max_grad_norm))
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def validate(accelerator, scorer, groups: EncodedGroups, config: TrainConfig) -> dict[str, float]:
    """Validation metrics (`scoring.validation_metrics`, less the group count) over all processes:
    each scores every W-th group with the unwrapped model (no DDP collectives per forward), and the
    sums are added."""
    plain = accelerator.unwrap_model(scorer)
    plain.eval()
    indices = list(range(accelerator.process_index, len(groups), accelerator.num_processes))
    sums = validation_sums(per_group_scores(plain, groups, indices, config))
    plain.train()
    metrics = validation_metrics(accelerator.reduce(sums.to(accelerator.device), "sum").cpu())
    return {k: v for k, v in metrics.items() if k != "groups"}


def final_metrics(history: list[dict], epochs: int) -> dict[str, dict[str, float]]:
    """The last validation metrics, and the training statistics averaged over the last epoch."""
    last_validation = next(r["metrics"] for r in reversed(history) if "val/ranking_accuracy" in r["metrics"])
    last_epoch = [r["metrics"] for r in history if "train/total" in r["metrics"] and r["metrics"]["epoch"] > epochs - 1]
    names = [k for k in (last_epoch[0] if last_epoch else {}) if k.startswith("train/")]
    return {"validation": {k[len("val/"):]: v for k, v in last_validation.items() if k.startswith("val/")},
            "train_last_epoch": {k[len("train/"):]: float(np.mean([m[k] for m in last_epoch])) for k in names}}


def fit(dm: DialogModel, train: EncodedGroups, validation: EncodedGroups, config: TrainConfig,
        stage_config: TrainStageConfig, accelerator, *, live=None, checkpoints: Path | None = None,
        fingerprint: str = "", desc: str = "train") -> dict[str, Any]:
    """Train `dm.model` for `stage_config.epochs` epochs; return the trained model (LoRA merged), the
    logged history, the final validation metrics and timing. Resumes from `checkpoints` when it holds
    a checkpoint with the same `fingerprint`."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler, set_seed

    # --- data
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(epoch_batches(len(train), config.batch_groups, config.seed, 0, world, rank))
    if stage_config.epochs and micro_per_epoch == 0:
        raise DataError(f"{len(train)} training groups make fewer batches of {config.batch_groups} than the "
                        f"{world} processes")
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum_steps)
    total_steps = steps_per_epoch * stage_config.epochs

    # --- model and optimizer
    set_seed(config.seed)
    model = add_lora(dm.model, config.lora) if config.lora.enabled else dm.model
    use_cache = model.config.use_cache
    model.config.use_cache = False  # no key/value cache while scoring teacher-forced targets
    scorer = GroupScorer(DialogModel(model, dm.tokenizer, dm.is_seq2seq))
    # Fused AdamW (one kernel for all parameters, on CPU and GPU) is what Trainer picks too.
    optimizer = torch.optim.AdamW(parameter_groups(scorer, config.weight_decay), lr=stage_config.learning_rate,
                                  fused=True)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=min(config.warmup_steps, total_steps),
                              num_training_steps=max(total_steps, 1))
    # The scheduler is not prepared: accelerate would step it once per process.
    scorer, optimizer = accelerator.prepare(scorer, optimizer)

    # --- resume
    step, history = 0, []
    if checkpoints is not None:
        step, history = resume(checkpoints, fingerprint, accelerator, scorer, optimizer, scheduler)
    if live is not None:
        for past in history:
            log_live(live, past["step"], past["metrics"])
    if step == 0:
        val = validate(accelerator, scorer, validation, config)
        log_metrics(history, live, step, {"epoch": 0, **prefixed("val", val)})

    # --- loop
    progress = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    train_seconds, read_tokens, scored_tokens = 0.0, 0, 0
    candidates = scored_candidates(train, config)
    scorer.train()
    for epoch in range(step // steps_per_epoch if steps_per_epoch else 0, stage_config.epochs):
        micro = epoch_batches(len(train), config.batch_groups, config.seed, epoch, world, rank)
        step_batches = [micro[i:i + config.grad_accum_steps] for i in range(0, len(micro), config.grad_accum_steps)]
        for index in range(step - epoch * steps_per_epoch, steps_per_epoch):
            started = time.perf_counter()
            chunk, step = step_batches[index], step + 1
            metrics = train_step(accelerator, scorer, optimizer, scheduler, train, chunk, config, step=step, epoch=epoch)
            train_seconds += time.perf_counter() - started
            read, scored = step_tokens(train, chunk, candidates)
            read_tokens, scored_tokens = read_tokens + read * world, scored_tokens + scored * world

            log_metrics(history, live, step, {"epoch": epoch + (index + 1) / steps_per_epoch, **prefixed("train", metrics)})
            progress.set_postfix(loss=f"{metrics['total']:.3f}", tok_s=f"{read_tokens / max(train_seconds, 1e-9):.0f}")
            progress.update()
            end_of_epoch = index == steps_per_epoch - 1
            if end_of_epoch:
                val = validate(accelerator, scorer, validation, config)
                log_metrics(history, live, step, {"epoch": epoch + 1, **prefixed("val", val)})
            if checkpoints is not None and (end_of_epoch or (config.checkpoint_steps and step % config.checkpoint_steps == 0)):
                save_checkpoint(checkpoints, accelerator, scorer, optimizer, scheduler, step, fingerprint, history)
    progress.close()

    # --- save (the caller writes the model)
    model = accelerator.unwrap_model(scorer).model
    if config.lora.enabled:
        model = model.merge_and_unload()
    model.config.use_cache = use_cache
    return {
        "model": model,
        "history": history,
        "steps": total_steps,
        "metrics": final_metrics(history, stage_config.epochs),
        "timing": {"train_seconds": train_seconds, "read_tokens": read_tokens, "scored_tokens": scored_tokens,
                   "tokens_per_second": read_tokens / train_seconds if train_seconds else None},
    }


def needs_launcher(config: TrainConfig) -> bool:
    """True when `train.processes` asks for DDP and this process was not started by a launcher."""
    return config.processes > 1 and "LOCAL_RANK" not in os.environ


def relaunch(processes: int, argv: list[str] | None = None) -> int:
    """Run this same command again as `processes` DDP workers under `torchrun` (one per GPU; gloo on
    CPUs) and return its exit status. The arguments go to the launcher as a list, never through a
    shell."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "pipeline", *argv]
    log.info("train.processes = %d: relaunching under torchrun", processes)
    return subprocess.run(command, check=False).returncode


def check_lengths(dm: DialogModel, config: TrainConfig) -> None:
    """The longest input must fit the model's position embeddings (where it has a limit)."""
    limit = getattr(dm.model.config, "max_position_embeddings", None)
    if limit is None:
        return
    if dm.is_seq2seq:
        longest, what = max(config.max_source_tokens, config.max_target_tokens), "max(train.max_source_tokens, max_target_tokens)"
    else:
        longest, what = config.max_source_tokens + 1 + config.max_target_tokens, "train.max_source_tokens + 1 + max_target_tokens"
    if longest > limit:
        raise ConfigError(f"{what} = {longest} is not allowed: the model at {dm.path} has {limit} positions")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = library_versions()
    for name in ("accelerate", "peft", "dvclive", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def run(config: TrainConfig, stage_config: TrainStageConfig, stage: int, init: Path, groups: Path, out: Path,
        live: Path | None = None, checkpoints: Path | None = None) -> dict[str, Any]:
    """Train one stage from `init` on `groups`, write the model to `out`; returns its train.json record."""
    started = time.time()
    init, groups, out = Path(init), Path(groups), Path(out)
    checkpoints = Path(checkpoints) if checkpoints else out.with_name(f"{out.name}_checkpoints")
    for path in (out, checkpoints, live):
        if path is not None:
            ensure_writable(path)
    train_table, validation_table = read_groups(groups, "train"), read_groups(groups, "validation")
    dm = load_init_model(init)
    check_lengths(dm, config)
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    train_groups = encode_groups(dm, train_table, config)
    validation_groups = encode_groups(dm, validation_table, config)
    log.info("stage %d: %d training and %d validation groups of 1 + %d from %s; model %s: %s, %s, %d parameters, "
             "on %s, %d process(es), precision %s", stage, len(train_groups), len(validation_groups),
             train_groups.negatives, groups, init, type(dm.model).__name__, "seq2seq" if dm.is_seq2seq else "causal",
             sum(p.numel() for p in dm.model.parameters()), accelerator.device, accelerator.num_processes,
             accelerator.mixed_precision)
    cut = {"train": train_groups.cut_counts(), "validation": validation_groups.cut_counts()}
    log.info("targets cut at train.max_target_tokens = %d (scored without eos): %d positives and %d negatives "
             "of the training groups, %d and %d of the validation groups", config.max_target_tokens,
             cut["train"]["positives"], cut["train"]["negatives"], cut["validation"]["positives"],
             cut["validation"]["negatives"])
    fingerprint = run_fingerprint(stage, config, stage_config, init, groups, accelerator.num_processes)

    logger = None
    if live is not None and main:
        from dvclive import Live

        logger = Live(str(live), save_dvc_exp=False, dvcyaml=None)
    try:
        result = fit(dm, train_groups, validation_groups, config, stage_config, accelerator, live=logger,
                     checkpoints=checkpoints, fingerprint=fingerprint, desc=f"train stage {stage}")
    finally:
        if logger is not None:
            logger.end()

    record = {
        "stage": stage,
        "init": str(init),
        "groups": str(groups),
        "config": {"train": dataclasses.asdict(config), stage_config.section: dataclasses.asdict(stage_config)},
        "git_commit": git_commit(),
        "library_versions": versions(),
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "precision": accelerator.mixed_precision,
        "data": {"train_groups": len(train_groups), "validation_groups": len(validation_groups),
                 "negatives_per_group": train_groups.negatives, "cut_targets": cut},
        "steps": result["steps"],
        "metrics": result["metrics"],
        # No timing: train.json is part of the model folder, whose bytes must not change between runs
        # (a resumed run would also count only its own tokens); throughput goes to the log.
    }
    if main:
        with staged_dir(out) as temp:
            result["model"].save_pretrained(temp)
            dm.tokenizer.save_pretrained(temp)
            write_json(record, temp / "train.json")
        clear_checkpoints(checkpoints)
        validation = result["metrics"]["validation"]
        log.info("wrote %s after %d steps in %.1f s (%s tokens/s read while training): validation ranking "
                 "accuracy %.3f, perplexity %.2f", out, result["steps"], time.time() - started,
                 f"{result['timing']['tokens_per_second']:.0f}" if result["timing"]["tokens_per_second"] else "no",
                 validation["ranking_accuracy"], validation["perplexity"])
    accelerator.wait_for_everyone()
    return record
