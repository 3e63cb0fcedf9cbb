"""GPU check: a few training steps of a BlenderBot-400M-sized model on n-pair groups, in bf16.

    python -m bench.gpu_check            # one GPU; on a machine without one it says so and exits 0

The model is built from `facebook/blenderbot-400M-distill`'s config (d_model 1280, 2 encoder and 12
decoder layers, 32 heads, FFN 5120, vocabulary 8008, 128 positions) with random weights and random
token ids: the work per step is what matters, not the text. Each step scores G groups of one positive
and 3 negatives through `modeling.token_logprobs` (the encoder runs once per context) and takes an
AdamW step on `losses.total_loss`, under bf16 autocast with float32 weights, as training does.

Prints tokens per second (source tokens through the encoder plus target tokens through the decoder)
and model FLOPs utilisation: `6 * params * tokens / time / peak`, where a token counts the
parameters it passes through (encoder layers for source tokens; decoder layers and the LM head for
target tokens; attention-score FLOPs left out, small at 128 positions). The crude
`6 * all params * all tokens` figure is printed beside it. Peak: dense bf16 of the device's data sheet
(H100 / H200 SXM 989 TFLOP/s). Runs in well under two minutes on one H100.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch

from pipeline.losses import cross_entropy, npair_loss, sequence_scores, severity_margins, total_loss
from pipeline.modeling import DialogModel, token_logprobs

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, data sheet (SXM)

BLENDERBOT_400M = dict(vocab_size=8008, d_model=1280, encoder_layers=2, decoder_layers=12,
                       encoder_attention_heads=32, decoder_attention_heads=32, encoder_ffn_dim=5120,
                       decoder_ffn_dim=5120, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, decoder_start_token_id=1)


def make_batch(groups: int, negatives: int, source_len: int, target_len: int, vocab: int, generator):
    """Random ids: `groups` sources of about `source_len` tokens, `groups * (1 + negatives)` targets."""
    def row(length):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        return torch.randint(3, vocab, (n,), generator=generator).tolist() + [2]  # eos last

    sources = [row(source_len - 1) for _ in range(groups)]
    targets = [row(target_len - 1) for _ in range(groups * (1 + negatives))]
    return sources, targets


def step_counts(model, sources, targets) -> tuple[int, float, float]:
    """Real tokens of a step, and its model FLOPs: per token the parameters it passes (x 6), and the
    crude all-parameters-times-all-tokens figure."""
    enc_tokens, dec_tokens = sum(map(len, sources)), sum(map(len, targets))
    embed = model.get_input_embeddings().weight.numel()  # tied with the LM head
    encoder = sum(p.numel() for n, p in model.named_parameters() if ".encoder." in f".{n}" and "embed" not in n)
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".decoder." in f".{n}" and "embed" not in n)
    total = sum(p.numel() for p in model.parameters())
    flops = 6 * (encoder * enc_tokens + (decoder + embed) * dec_tokens)
    return enc_tokens + dec_tokens, flops, 6 * total * (enc_tokens + dec_tokens)


def run_check(config_kwargs: dict, groups: int, negatives: int, source_len: int, target_len: int,
              steps: int, warmup: int, device: str) -> dict:
    """Build the model on `device`, run `warmup + steps` training steps, return the timed figures."""
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = BlenderbotForConditionalGeneration(BlenderbotConfig(**config_kwargs)).train()
    dm = DialogModel(model, SimpleNamespace(pad_token_id=config_kwargs["pad_token_id"]), is_seq2seq=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    use_bf16 = device == "cuda"
    generator = torch.Generator().manual_seed(0)
    batches = [make_batch(groups, negatives, source_len, target_len, config_kwargs["vocab_size"], generator)
               for _ in range(warmup + steps)]
    severity = torch.rand(groups, negatives, generator=generator).to(device)
    C = 1 + negatives

    def step(sources, targets):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            logps, mask = token_logprobs(dm, sources, targets, candidates_per_source=C)  # (G*C, T)
        scores = sequence_scores(logps, mask).view(groups, C)  # (G, C)
        positive_rows = torch.arange(groups, device=logps.device) * C
        ce = cross_entropy(logps[positive_rows], mask[positive_rows])
        npair, diagnostics = npair_loss(scores[:, 0], scores[:, 1:], severity_margins(severity, 0.5), tau=0.5)
        loss = total_loss(ce, npair, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for sources, targets in batches[:warmup]:
        step(sources, targets)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens = flops = crude = 0
    losses = []
    started = time.perf_counter()
    for sources, targets in batches[warmup:]:
        losses.append(step(sources, targets))
        t, f, c = step_counts(model, sources, targets)
        tokens, flops, crude = tokens + t, flops + f, crude + c
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    losses = [float(x) for x in losses]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps, "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds, "crude_flops_per_s": crude / seconds,
        "losses": losses,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; this check measures a BlenderBot-400M-sized model in "
              "bf16 and only runs on a GPU (nothing was measured).")
        return 0
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    groups, negatives = 32, 3
    print(f"gpu_check on {name}: BlenderBot-400M-sized model from config, {groups} groups x (1 + {negatives}) "
          "candidates per step, 128 source / 64 target tokens at most, bf16 autocast")
    result = run_check(BLENDERBOT_400M, groups, negatives, source_len=128, target_len=64, steps=20, warmup=3,
                       device="cuda")
    print(f"parameters        {result['parameters'] / 1e6:.0f}M")
    print(f"steps timed       {result['steps']} in {result['seconds']:.2f} s ({result['tokens']} real tokens)")
    print(f"tokens/s          {result['tokens_per_s']:,.0f}")
    print(f"model TFLOP/s     {result['flops_per_s'] / 1e12:.1f} "
          f"(crude 6*N*tokens: {result['crude_flops_per_s'] / 1e12:.1f})")
    if peak:
        print(f"MFU               {result['flops_per_s'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16 "
              f"(crude: {result['crude_flops_per_s'] / peak:.1%})")
    else:
        print(f"MFU               unknown peak for {name!r}")
    print(f"peak memory       {result['peak_memory_gib']:.1f} GiB")
    print(f"loss first/last   {result['losses'][0]:.3f} / {result['losses'][-1]:.3f}")
    finite = all(torch.isfinite(torch.tensor(result["losses"])))
    print("losses finite     " + ("yes" if finite else "NO"))
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
