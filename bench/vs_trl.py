"""lightning_tina against TRL's GRPOTrainer: the same model, prompts, reward and settings, in alternating runs.

Every run is a fresh subprocess (one tool, one engine, one model size) that trains `--warmup` steps and then
`--steps` measured steps; runs rotate their order round after round so that neither tool always goes first on a
noisy, shared machine. A step's time is the wall time between the ends of two consecutive optimizer steps (data,
generation, rewards, reference log-probs, forward, backward, optimizer and logging: everything). Both tools get
the same thread count, float32 weights, no gradient checkpointing, LoRA r=8 alpha=32 dropout 0 on all seven
projections, 8 prompts x 4 generations, completions forced to exactly `--tokens` tokens, beta 0.04, loss "grpo",
and lightning_tina's accuracy + format rewards (weights 1, 1).

    python bench/vs_trl.py                          # tiny and 18m, TRL (generate) vs lightning_tina (hf, vllm)
    python bench/vs_trl.py --sizes 18m --rounds 3
    python bench/vs_trl.py --train-only             # training part only (fixed random rollouts, no generation)
    python bench/vs_trl.py --gpu                    # training part on a 1.5B-shaped Qwen2 on CUDA

Prints a table and one JSON line (prefix "JSON ").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from vs_trl_workers import LORA_ALPHA, LORA_R, LT_ENGINES, PROMPTS, worker  # noqa: E402

# ---- the orchestrator ------------------------------------------------------------------------------------------


def _flags(**opts: Any) -> list[str]:
    """Command-line flags from keyword options (True: a bare flag; False/None: left out)."""
    out: list[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, str(value)]
    return out


def _run(cmd: list[str], label: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Run one subprocess with the pinned thread count; its last JSON record, or None (with its output) on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(common.REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    records = common.parse_json_lines(proc.stdout)
    if proc.returncode or not records:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        print(f"!! {label} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return None
    return records[-1]


def _model(size: str, args: argparse.Namespace) -> Path:
    tiny = common.tiny_dir(args.tiny_dir)
    return (
        tiny
        if size == "tiny"
        else common.build_random_qwen2(size, Path(args.workdir) / f"qwen2-{size}", tiny)
    )


def _summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled step-time spread (wall and CPU), per-run medians, phase medians and peak RSS of one configuration."""
    wall = common.spread([s for rec in recs for s in rec["step_s"]])
    cpu = common.spread([s for rec in recs for s in rec["cpu_step_s"]])
    names = sorted({p for rec in recs for p in rec["phases"]})
    return {
        **wall,
        **{f"cpu_{k}": cpu[k] for k in ("median", "min", "max")},
        "run_medians": [common.spread(rec["step_s"])["median"] for rec in recs],
        "phases": {
            p: common.spread([rec["phases"][p] for rec in recs if p in rec["phases"]])["median"]
            for p in names
        },
        "peak_rss_gb": max(rec["peak_rss_gb"] for rec in recs),
        "completion_length": sorted({x for rec in recs for x in rec["completion_length"]}),
    }


def orchestrate(args: argparse.Namespace) -> None:
    """Alternate runs of every (tool, engine) per size; print medians, spreads and ratios."""
    runs = (
        [("trl", "hf")]
        + ([("trl", "hf-eager")] if args.trl_eager else [])
        + [("lt", e) for e in args.lt_engines]
    )
    common_flags = _flags(
        steps=args.steps,
        warmup=args.warmup,
        tokens=args.tokens,
        threads=args.threads,
        seed=args.seed,
        precision=args.precision,
        dtype=args.dtype,
    )
    summary: dict[str, dict[str, Any]] = {}
    rows, ratios = [], {}
    for size in args.sizes:
        model = _model(size, args)
        print(f"== {size}: {model} ({common.count_parameters(model) / 1e6:.2f}M parameters)", flush=True)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            k = r % len(runs)
            for tool, engine in runs[k:] + runs[:k]:  # rotate: every tool takes every position in turn
                cmd = [
                    sys.executable,
                    __file__,
                    *_flags(worker=tool, engine=engine, model=model),
                    *common_flags,
                ]
                rec = _run(cmd, f"{tool}/{engine} on {size}", args)
                if rec is not None:
                    results.setdefault((tool, engine), []).append(rec)
                    med = common.spread(rec["step_s"])["median"]
                    print(
                        f"   round {r}: {tool}/{engine}: median {med:.3f} s/step, load {rec['load_avg']:.1f}"
                    )
        for (tool, engine), recs in results.items():
            s = summary[f"{size}/{tool}/{engine}"] = _summary(recs)
            rows.append(
                {
                    "size": size,
                    "tool": "lightning_tina" if tool == "lt" else "trl",
                    "engine": engine,
                    "steps": s["n"],
                    "peak_rss_gb": s["peak_rss_gb"],
                    **{f"{k}_s": s[k] for k in ("median", "min", "max", "cpu_median", "cpu_min", "cpu_max")},
                    **{f"{p}_s": s["phases"].get(p, float("nan")) for p in ("rollout", "reward")},
                }
            )
        trl = summary.get(f"{size}/trl/hf")
        lts = {e: summary[f"{size}/lt/{e}"] for e in args.lt_engines if f"{size}/lt/{e}" in summary}
        if trl and lts:
            best = min(
                lts, key=lambda e: lts[e]["cpu_median"]
            )  # CPU time: far less noisy on a shared machine
            ratios[size] = {
                "best_engine": best,
                "lt_best_over_trl": lts[best]["median"] / trl["median"],
                "cpu_lt_best_over_trl": lts[best]["cpu_median"] / trl["cpu_median"],
            }
            if "hf" in lts:
                ratios[size]["lt_hf_over_trl_hf"] = lts["hf"]["median"] / trl["median"]
                ratios[size]["cpu_lt_hf_over_trl_hf"] = lts["hf"]["cpu_median"] / trl["cpu_median"]
    columns = (
        "size tool engine median_s min_s max_s cpu_median_s cpu_min_s cpu_max_s steps rollout_s reward_s"
    )
    common.print_table(
        rows,
        [*columns.split(), "peak_rss_gb"],
        title="\nseconds per GRPO step, wall and process CPU (all measured steps pooled)",
    )
    for size, r in ratios.items():
        line = f"{size}: lightning_tina ({r['best_engine']}) / TRL = {r['lt_best_over_trl']:.2f} wall, "
        line += f"{r['cpu_lt_best_over_trl']:.2f} CPU"
        if "lt_hf_over_trl_hf" in r:
            line += f"; both on HF generate: {r['lt_hf_over_trl_hf']:.2f} wall, {r['cpu_lt_hf_over_trl_hf']:.2f} CPU"
        print(line)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "engine", "model", "device")}
    common.emit_json(
        {
            "bench": "vs_trl",
            "settings": settings,
            "results": summary,
            "ratios": ratios,
            "machine": common.machine(),
        }
    )


def orchestrate_training_part(args: argparse.Namespace) -> None:
    """Alternate lightning_tina (`step_breakdown.py --synthetic`) and TRL (its compute_loss) on fixed random
    rollouts; compare training tokens per second and the allocator's peak."""
    model = _model(args.size, args)
    shared = _flags(
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        precision=args.precision,
        dtype=args.dtype,
        prompt_tokens=args.prompt_tokens,
        tokens=args.tokens,
        prompts=args.prompts,
        micro_batch=args.micro_batch,
        length_spread=args.length_spread,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    breakdown = str(Path(__file__).with_name("step_breakdown.py"))
    cmds = {
        "lightning_tina": [
            sys.executable,
            breakdown,
            *_flags(
                synthetic=True,
                size=args.size,
                workdir=args.workdir,
                gpu=args.gpu,
                micro_batch_tokens=args.micro_batch_tokens,
            ),
            *shared,
        ],
        "trl": [
            sys.executable,
            __file__,
            *_flags(worker="trl-train", model=model, device="cuda" if args.gpu else "cpu"),
            *shared,
        ],
    }
    results: dict[str, list[dict[str, Any]]] = {"lightning_tina": [], "trl": []}
    for r in range(args.rounds):
        for tool in list(cmds) if r % 2 == 0 else list(cmds)[::-1]:
            rec = _run(cmds[tool], tool, args)
            if rec is not None:
                results[tool].append(rec)
                print(f"   round {r}: {tool}: {rec['train_tokens_per_s']:.0f} training tokens/s", flush=True)
    rows = []
    for tool, recs in results.items():
        if not recs:
            continue
        if tool == "lightning_tina":  # peak of every phase of the (synthetic) step
            peak = max(max(x["peak_gb_by_phase"].values(), default=float("nan")) for x in recs)
        else:
            peak = max(x["train_peak_gb"] for x in recs)
        tps = common.spread([x["train_tokens_per_s"] for x in recs])
        cps = common.spread([x["train_tokens_per_cpu_s"] for x in recs])
        rows.append(
            {
                "tool": tool,
                "tokens_per_s": tps["median"],
                "tokens_per_cpu_s": cps["median"],
                "min": tps["min"],
                "max": tps["max"],
                "runs": tps["n"],
                "cuda_peak_gb": peak if args.gpu else float("nan"),
                "peak_rss_gb": max(x["peak_rss_gb"] for x in recs),
            }
        )
    common.print_table(
        rows,
        "tool tokens_per_s min max tokens_per_cpu_s runs cuda_peak_gb peak_rss_gb".split(),
        title="\ntraining part (reference log-probs + forward + backward), medians over runs",
    )
    common.emit_json(
        {
            "bench": "vs_trl_training_part",
            "model": str(model),
            "settings": vars(args),
            "rows": rows,
            "runs": results,
            "machine": common.machine(),
        }
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the options; run as orchestrator, as one worker run, or (--gpu / --train-only) the training part."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "18m"], choices=["tiny", "18m"])
    p.add_argument(
        "--lt-engines",
        nargs="+",
        default=["hf", "vllm"],
        choices=LT_ENGINES,
        help="lightning_tina engines to run (TRL always uses generate): vllm serves merged weights in the "
        "trainer's dtype, vllm-bf16 in bfloat16, vllm-lora the LoRA adapter",
    )
    p.add_argument(
        "--trl-eager", action="store_true", help="also run TRL with eager attention (its default is SDPA)"
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="runs per tool/engine/size, order rotated each round"
    )
    p.add_argument("--steps", type=int, default=10, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run (at least 1)")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens, forced")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads, the same for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: bf16 autocast in training (TRL bf16=True, Lightning bf16-mixed); weights and "
        "rollout engines stay as --dtype",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the frozen base weights of both tools (Tina loads bfloat16; LoRA weights stay float32)",
    )
    p.add_argument("--tiny-dir", default=None, help="the tiny model (default data/tiny)")
    p.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "lightning_tina_bench"),
        help="where random-weight models are built (reused when present)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is abandoned")
    p.add_argument("--worker", choices=["lt", "trl", "trl-train"], help=argparse.SUPPRESS)
    p.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    t = p.add_argument_group("training part (--train-only, --gpu): fixed random rollouts, no generation")
    t.add_argument("--train-only", action="store_true", help="compare only the training forward/backward")
    t.add_argument(
        "--gpu", action="store_true", help="--train-only on CUDA with common.GPU_SETTINGS (1.5B shape)"
    )
    t.add_argument("--size", default="18m", choices=["tiny", "18m", "qwen1.5b"])
    t.add_argument("--prompts", type=int, default=PROMPTS)
    t.add_argument("--prompt-tokens", type=int, default=32)
    t.add_argument("--micro-batch", type=int, default=0, help="sequences per forward/backward (0: all)")
    t.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="completion lengths uniform in [(1 - F) * tokens, tokens] per sequence, the same for both tools",
    )
    t.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=-1,
        help="lightning_tina: packed passes of at most this many tokens (0: count-based micro-batches, "
        "-1: auto, the default)",
    )
    t.add_argument("--lora-r", type=int, default=LORA_R)
    t.add_argument("--lora-alpha", type=int, default=LORA_ALPHA)
    t.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    if args.gpu and not args.worker:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
        vars(args).update(common.GPU_SETTINGS, train_only=True)
        if "--steps" not in (argv if argv is not None else sys.argv):
            args.steps = 3  # each step trains 8 x 4,096 tokens: 3 measured steps per run keep GPU time short
    if args.warmup < 1:
        p.error("--warmup must be at least 1: a step's time is measured from the end of the previous step")
    if args.worker:
        worker(args)
    elif args.train_only:
        orchestrate_training_part(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
