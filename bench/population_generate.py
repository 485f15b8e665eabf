"""How the Hugging Face engine should sample a population's rollouts: one mixed-adapter call or one call per adapter.

Three ways to sample K adapters x B prompts x G completions from the shipped tiny model (data/tiny), at mini-Tina's
shapes (the prompts of the tiny arithmetic task, G 8, up to 96 new tokens, temperature 0.7, completions ending at
EOS as the model decides):

- routed: one `generate` call over every adapter's prompts, each row's LoRA computed by its own adapter
  (lightning_tina.population.routed, what HFEngine does for a mixed batch);
- peft: the same single call through PEFT's `adapter_names=[...]` (its mixed-batch forward, eval mode);
- per_adapter: one `generate` call per adapter (the adapter active), K calls.

The adapters get small random lora_B weights (seeded) so that they differ. Each way runs `--repeats` times,
interleaved; printed: median seconds per step-sized call, completion tokens per second, and the ratio to one
adapter's call alone (the solo run's rollout).

    python bench/population_generate.py --adapters 4 --prompts 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _policy(k: int):
    from lightning_tina.optim import OptimSettings
    from lightning_tina.policy import LoRASettings, load_causal_lm, load_tokenizer
    from lightning_tina.population import AdapterSettings, build_adapters, resolve_population

    tok = load_tokenizer(str(ROOT / "data/tiny"))
    base = load_causal_lm(str(ROOT / "data/tiny"))
    members = resolve_population(
        [AdapterSettings(f"m{i}") for i in range(k)],
        LoRASettings(r=16, alpha=32, dropout=0.0),
        OptimSettings(),
    )
    policy = build_adapters(base, members)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    policy.eval()
    return policy, tok, [m.name for m in members]


def _prompts(n: int) -> list[list[int]]:
    from lightning_tina.datamodule import ReasoningDataModule
    from lightning_tina.tiny.task import heldout_rows

    dm = ReasoningDataModule(tokenizer=str(ROOT / "data/tiny"))
    dm.setup("fit")
    return [dm.render(r["problem"]) for r in heldout_rows(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per adapter (mini-Tina: 8)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from lightning_tina.population import activate, adapter_major
    from lightning_tina.rollout.base import SamplingConfig
    from lightning_tina.rollout.hf import HFEngine

    policy, tok, names = _policy(args.adapters)
    prompts = _prompts(args.prompts)
    engine = HFEngine(policy, tok, max_batch_prompts=args.prompts * args.adapters)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7)
    everyone = prompts * len(names)
    labels = adapter_major(names, len(prompts))

    def routed():
        return engine.generate(everyone, args.generations, sampling, adapters=labels)

    def peft():
        ids, mask, width = _left_padded(everyone, tok.pad_token_id)
        rows = adapter_major(names, len(prompts) * args.generations)  # generate's expanded rows
        with torch.no_grad():
            out = policy.generate(
                input_ids=ids.repeat_interleave(args.generations, 0),
                attention_mask=mask.repeat_interleave(args.generations, 0),
                adapter_names=rows,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=0.7,
                top_k=0,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        return [row[width:] for row in out.tolist()]

    def per_adapter():
        out = []
        for name in names:
            out += engine.generate(prompts, args.generations, sampling, adapters=[name] * len(prompts))
        return out

    def solo():
        activate(policy, names[0])
        return engine.generate(prompts, args.generations, sampling)

    ways = {"solo (one adapter)": solo, "routed": routed, "peft": peft, "per_adapter": per_adapter}
    times: dict[str, list[float]] = {w: [] for w in ways}
    tokens: dict[str, list[int]] = {w: [] for w in ways}
    torch.manual_seed(0)
    for _ in range(args.repeats):
        for way, fn in ways.items():
            t0 = time.perf_counter()
            gens = fn()
            times[way].append(time.perf_counter() - t0)
            tokens[way].append(sum(_length(g, tok) for g in gens))
    solo_s = statistics.median(times["solo (one adapter)"])
    print(
        f"{args.adapters} adapters x {args.prompts} prompts x G {args.generations}, up to {args.max_new_tokens} "
        f"tokens, torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"{'way':<20} {'s/call':>8} {'tokens/s':>9} {'x solo':>7}")
    for way in ways:
        s = statistics.median(times[way])
        rate = statistics.median(t / dt for t, dt in zip(tokens[way], times[way], strict=True))
        print(f"{way:<20} {s:>8.3f} {rate:>9.0f} {s / solo_s:>7.2f}")


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask, width


def _length(g, tok) -> int:
    """Sampled tokens of one completion (a Generation, or a raw row padded after EOS)."""
    ids = g.token_ids if hasattr(g, "token_ids") else g
    return ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)


if __name__ == "__main__":
    main()
