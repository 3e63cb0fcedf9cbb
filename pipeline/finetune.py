"""Cross-entropy fine-tuning on (context, reply) pairs: the scratch base model's pretraining
(`base_model.pretrain`) and DExperts' expert and anti-expert (`dexperts`), one loop for both.

The pairs are tables in `scoring.GROUP_COLUMNS`' row format without negatives (the reply the positive,
no RoTs), written and scored exactly as the training stages write and score a positive
(`pipeline/scoring.py`, in the model's own format). Each step is the training stages' loss with
`contrastive_weight = 0` (`scoring.score_batch` on the positives, `losses.cross_entropy`): AdamW without
weight decay, linear warm-up over 10% of the steps and linear decay, gradients clipped at 1; with LoRA
(`lora.enabled`, peft) only the adapters train and are merged before the model is returned.
"""

from __future__ import annotations

import logging
import math
import time

from pipeline import devices
from pipeline.config import TrainConfig, TrainLoraConfig
from pipeline.errors import PipelineError
from pipeline.modeling import DialogModel

log = logging.getLogger(__name__)

WARMUP_SHARE = 0.1  # of the optimizer steps: linear warm-up, then linear decay to 0
MAX_GRAD_NORM = 1.0  # as train.max_grad_norm's default


def pair_settings(config) -> TrainConfig:
    """The `train` settings that `scoring.encode_groups` and `scoring.per_group_scores` read, taken from
    a pair-training section (`base_model.pretrain`, `dexperts`): the reply alone as target, cut
    lengths, batch sizes."""
    return TrainConfig(rot_target=False, length_normalized=True, contrastive_weight=0.0,
                       max_source_tokens=config.max_source_tokens, max_target_tokens=config.max_target_tokens,
                       batch_groups=config.batch_size, eval_batch_groups=2 * config.batch_size,
                       precision=config.precision, seed=config.seed)


def validation_loss(scorer, pairs, settings: TrainConfig, device: str, precision: str) -> dict:
    """Mean cross-entropy per target token of the validation pairs (the reply and eos), its perplexity
    and the token count: the positives' perplexity of `scoring.validation_metrics`."""
    import torch

    from pipeline.scoring import per_group_scores

    scorer.eval()
    with torch.no_grad(), devices.autocast(device, precision):
        scores = per_group_scores(scorer, pairs, list(range(len(pairs))), settings)
    scorer.train()
    nll, tokens = float(scores["positive_nll"].sum()), int(scores["positive_tokens"].sum())
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens}


def add_lora(model, lora: TrainLoraConfig):
    """Wrap `model` with LoRA adapters (peft); only they are trained. A module name peft does not find
    is a one-line ConfigError naming `<section>.lora.target_modules`."""
    from peft import LoraConfig, get_peft_model

    from pipeline.errors import ConfigError

    try:
        adapters = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules)
        return get_peft_model(model, adapters)
    except ValueError as error:
        raise ConfigError(f"{lora.section}.target_modules = {lora.target_modules!r} is not allowed: "
                          f"{str(error).splitlines()[0]}") from None


def fit_pairs(dm: DialogModel, train_table, validation_table, config, desc: str, key: str):
    """Train `dm.model` with cross-entropy on (context, reply) pairs; returns the trained model (LoRA
    merged into it; the same object when there is no LoRA), the record (pairs, cut targets, steps,
    device, precision, the validation loss and perplexity before and after, per-epoch history) and the
    timing of the optimizer steps (seconds, tokens read, tokens per second). `config` has the fields of
    `BaseModelPretrainConfig` that it reads (epochs, batch_size, learning_rate, the token limits,
    precision, seed, and `lora` where the section has one), `key` names its section in messages.

    Runs on the model device at `config.precision` (`pipeline/devices.py`); batches are a permutation
    per epoch drawn from (seed, epoch), and dropout is seeded, so a CPU run is the same for the same seed.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler, set_seed

    from pipeline.losses import cross_entropy
    from pipeline.scoring import GroupScorer, encode_groups, score_batch

    # --- data
    settings = pair_settings(config)
    train, validation = (encode_groups(dm, t, settings) for t in (train_table, validation_table))
    read_tokens = np.array([len(p) + len(t[0]) for p, t in zip(train.prompt_ids, train.target_ids)])  # per pair
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    # --- model and optimizer
    device = devices.model_device()
    precision = devices.resolve_precision(config.precision, f"{key}.precision")
    set_seed(config.seed)
    lora = getattr(config, "lora", None)
    model = add_lora(dm.model, lora) if lora is not None and lora.enabled else dm.model
    model.to(device).train()
    use_cache = model.config.use_cache
    model.config.use_cache = False  # no key/value cache while scoring teacher-forced targets
    scorer = GroupScorer(DialogModel(model, dm.tokenizer, dm.is_seq2seq))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(WARMUP_SHARE * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    log.info("%s: %d pairs for %d epoch(s), %d steps of %d, on %s (%s%s); validation on %d pairs", desc,
             len(train), config.epochs, total_steps, config.batch_size, device, precision,
             f", LoRA r {lora.r}" if lora is not None and lora.enabled else "", len(validation))

    # --- loop
    before = validation_loss(scorer, validation, settings, device, precision)
    history = [{"epoch": 0, "validation": before}]
    log.info("%s: validation perplexity before %.2f", desc, before["perplexity"])
    progress = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)
    started, seconds, tokens = time.perf_counter(), 0.0, 0
    for epoch in range(config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
        losses = []
        for start in range(0, len(order), config.batch_size):
            step_started = time.perf_counter()
            batch = order[start:start + config.batch_size].tolist()
            with devices.autocast(device, precision):
                logps, mask, _ = score_batch(scorer, train, batch, 1, settings.length_normalized)  # (G, 1, T)
                loss = cross_entropy(logps[:, 0], mask[:, 0])
            if not math.isfinite(loss.item()):
                raise PipelineError(f"{desc}: the loss is not finite at step {progress.n + 1}; lower "
                                    f"{key}.learning_rate, or use {key}.precision fp32")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seconds, tokens = seconds + time.perf_counter() - step_started, tokens + int(read_tokens[batch].sum())
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / seconds:.0f}")
            progress.update()
        after = validation_loss(scorer, validation, settings, device, precision)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "validation": after})
        log.info("%s: epoch %d: training loss %.3f, validation perplexity %.2f", desc, epoch + 1,
                 history[-1]["train_loss"], after["perplexity"])
    progress.close()
    model.config.use_cache = use_cache
    if model is not dm.model:
        model = model.merge_and_unload()
    model.to("cpu").eval()
    timing = {"train_seconds": seconds, "read_tokens": tokens,
              "tokens_per_second": tokens / seconds if seconds else None}
    log.info("%s: trained in %.1f s (%.0f tokens/s read while training)", desc, time.perf_counter() - started,
             timing["tokens_per_second"] or 0)
    # No timing in the record: it is part of the model folder, whose bytes must not change between runs.
    record = {
        "pairs": {"train": len(train), "validation": len(validation)},
        "cut_targets": {"train": train.cut_counts()["positives"], "validation": validation.cut_counts()["positives"]},
        "steps": total_steps,
        "device": device,
        "precision": precision,
        "validation": {"before": before, "after": history[-1]["validation"]},
        "history": history,
    }
    return model, record, timing
