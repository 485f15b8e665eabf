"""Peak memory of per-token log-probs over a Qwen-sized vocabulary, against the full float32 logits tensor.

`lightning_tina.grpo.token_logprobs` computes log softmax(h W^T)[y] in chunks of `chunk_tokens` tokens with a
hand-written backward that recomputes a chunk's logits, so no [batch, length, vocab] float32 tensor exists in the
forward or the backward pass.
This bench runs it forward and backward (the gradient reaches the hidden states, as under LoRA; the head is frozen)
with batch 8 x 4,096 completion tokens x 151,936 vocabulary, a small hidden size so that it fits a laptop CPU, and
prints the peak next to the 19.9 GB the full tensor would take. Target: below a quarter of it.

Each chunk size runs in a fresh subprocess, so that the process's peak resident memory (ru_maxrss) belongs to that
configuration alone; the "added" column is that peak minus the resident memory after the inputs were allocated.

    python bench/logprob_memory.py                         # chunks of 1024 and 4096 tokens, CPU
    python bench/logprob_memory.py --chunk-tokens 512 1024 2048
    python bench/logprob_memory.py --gpu                   # CUDA, hidden 1536 (the 1.5B model's), bf16 hidden

Prints a table and one JSON line (prefix "JSON ").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

# Transient [chunk, V] float32 tensors alive at once at the peak (log-probs and p log p in the forward, the logits'
# gradient and its matmul-dtype copy in the backward), with a margin: used only to refuse a run that would not fit
# the free memory of a shared machine, never as a result.
_LIVE_CHUNK_TENSORS = 3


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One forward + backward of token_logprobs with `args.chunk` tokens per chunk; returns memory and time."""
    import torch

    from lightning_tina.grpo import token_logprobs

    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(args.batch, args.tokens, args.hidden, generator=g) * 0.5).to(
        device, dtype
    )  # [B, C, H]
    hidden.requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(
        device, dtype
    )  # [V, H]
    targets = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g).to(device)  # [B, C]
    advantages = torch.randn(args.batch, 1, generator=g).to(device)  # [B, 1]
    common.sync_device()
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = common.rss_bytes()
    start = time.perf_counter()
    logps, entropy = token_logprobs(hidden, targets, weight, None, 1.0, args.chunk)  # [B, C] each
    loss = -(logps * advantages).mean()
    forward_s = time.perf_counter() - start
    loss.backward()
    common.sync_device()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if args.gpu else common.peak_rss_bytes()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    return {
        "chunk_tokens": args.chunk,
        "peak_gb": peak / 1e9,
        "added_gb": (peak - base) / 1e9,
        "inputs_gb": base / 1e9,
        "forward_s": forward_s,
        "forward_backward_s": seconds,
        "logps_shape": list(logps.shape),
        "mean_entropy": float(entropy.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    """Run every chunk size in its own subprocess and compare with the full-tensor size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="completion tokens per sequence")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument(
        "--hidden", type=int, default=64, help="hidden size (small on CPU: the head matmul dominates)"
    )
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="CUDA allocator peak, bf16 hidden states, hidden 1536")
    p.add_argument("--force", action="store_true", help="run even when the free memory looks too small")
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # set in the per-chunk subprocess
    args = p.parse_args(argv)
    if args.gpu and args.hidden == 64:
        args.hidden = 1536
    common.pin_threads(args.threads)
    if args.chunk is not None:
        common.emit_json(measure(args))
        return
    import psutil

    full = args.batch * args.tokens * args.vocab * 4  # bytes of a float32 [B, C, V] tensor
    print(
        f"full float32 [{args.batch}, {args.tokens}, {args.vocab}] tensor: {full / 1e9:.1f} GB; "
        f"target: below {full / 4e9:.2f} GB",
        flush=True,
    )
    rows = []
    for chunk in args.chunk_tokens:
        need = _LIVE_CHUNK_TENSORS * min(chunk, args.tokens) * args.vocab * 4
        free = psutil.virtual_memory().available
        if not args.gpu and not args.force and need > 0.7 * free:
            print(
                f"chunk {chunk}: skipped, it may need about {need / 1e9:.1f} GB and {free / 1e9:.1f} GB is free "
                "(--force runs it anyway)",
                flush=True,
            )
            continue
        cmd = [
            sys.executable,
            __file__,
            "--chunk",
            str(chunk),
            "--batch",
            str(args.batch),
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--threads",
            str(args.threads),
        ] + (["--gpu"] if args.gpu else [])
        env = dict(os.environ, PYTHONPATH=str(common.REPO), OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        recs = common.parse_json_lines(proc.stdout)
        if proc.returncode or not recs:
            print(f"chunk {chunk}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = recs[-1]
        r.update(
            full_tensor_gb=full / 1e9,
            fraction_of_full=r["peak_gb"] * 1e9 / full,
            below_quarter=r["peak_gb"] * 1e9 < full / 4,
        )
        rows.append(r)
        print(
            f"chunk {chunk}: peak {r['peak_gb']:.2f} GB ({r['fraction_of_full']:.1%} of the full tensor), "
            f"{r['forward_backward_s']:.1f} s",
            flush=True,
        )
    common.print_table(
        rows,
        [
            "chunk_tokens",
            "peak_gb",
            "added_gb",
            "full_tensor_gb",
            "fraction_of_full",
            "below_quarter",
            "forward_s",
            "forward_backward_s",
        ],
        title="\nlog-prob memory",
    )
    common.emit_json(
        {
            "bench": "logprob_memory",
            "batch": args.batch,
            "tokens": args.tokens,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "device": "cuda" if args.gpu else "cpu",
            "full_tensor_gb": full / 1e9,
            "results": rows,
            "machine": common.machine(),
        }
    )


if __name__ == "__main__":
    main()
