"""Merge a LoRA adapter into its base model and write a standalone Hugging Face model, then prove they agree.

    python -m lightning_tina.export --adapter runs/tiny/version_0/adapters/step-000060 --out merged/ [--base PATH]

Tina merged its adapters before evaluation; with lightning_tina evaluation can serve the adapter directly, but a
merged model is what other tools (and the Hub) expect. After writing, the merged model's logits are compared with
the base+adapter model's on a few prompts; the command fails if they differ by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_tina.policy import load_causal_lm, load_tokenizer

CHECK_PROMPTS = ["Compute (3+4)*2.", "What is the sum of the first 10 positive integers?", "Solve x^2 = 16."]


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"--adapter {adapter}: no adapter_config.json; point it at a PEFT adapter folder"
        )
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_file} names no base_model_name_or_path; pass --base")
    return base


def merge(base: str, adapter: Path, dtype: str = "float32") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(merged model, base+adapter model) — two copies, so that they can be compared."""
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(load_causal_lm(base, dtype), str(adapter)).eval()
    merged = PeftModel.from_pretrained(load_causal_lm(base, dtype), str(adapter)).merge_and_unload().eval()
    return merged, with_adapter


@torch.no_grad()
def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, tokenizer, prompts: list[str]) -> float:
    """max |logits_a - logits_b| over every position of every prompt."""
    worst = 0.0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, T]
        worst = max(worst, float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tina.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--adapter", type=Path, required=True, help="PEFT adapter folder (an AdapterCheckpoint)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    parser.add_argument(
        "--base", help="base model path or hub id (default: the adapter's base_model_name_or_path)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest allowed logit difference (float32)"
    )
    args = parser.parse_args(argv)

    base = args.base or adapter_base(args.adapter)
    tokenizer = load_tokenizer(base)
    merged, with_adapter = merge(base, args.adapter, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reloaded = load_causal_lm(str(args.out), args.dtype).eval()
    diff = max_logit_difference(reloaded, with_adapter, tokenizer, CHECK_PROMPTS)
    print(f"merged model written to {args.out}; max |logit difference| vs base+adapter = {diff:.3g}")
    if diff > args.tolerance:
        raise SystemExit(
            f"merged logits differ by {diff:.3g} > --tolerance {args.tolerance}: do not use this export"
        )
    return diff


if __name__ == "__main__":
    main()
