"""Where a model runs and at what precision — one rule for every stage that runs a model.

Training, test-set scoring (`score`), generation and the stage-1 sampler of `mine` all resolve
their `precision` setting here: `auto` is bf16 on a GPU that supports it and fp32 otherwise (always
fp32 on a CPU); fp16 needs a GPU. Models run on the first GPU when there is one.
"""

from __future__ import annotations

import contextlib

from pipeline.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, key: str, cuda: bool | None = None) -> str:
    """`auto` resolved to fp32 / bf16 for this machine; fp16 without a GPU is a ConfigError naming `key`."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"{key} = 'fp16' is not allowed here: fp16 needs a GPU (use fp32 or bf16)")
    return precision


def model_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str, precision: str):
    """A context in which a model's forward passes run at `precision` (resolved); fp32 changes nothing."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)
