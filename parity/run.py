"""The parity harness, one command: lightning_tina against Tina's own code, each in its own environment.

    .venv/bin/python parity/run.py --tina-dir PATH_TO_TINA_CHECKOUT [--out DIR] [--only objective,prompts,rewards]

Parts (each side a separate process; Tina's side runs in parity/.venv-tina, built by parity/setup_env.sh with Tina's
pins):
- objective: Tina's trainer step (`compute_loss` and the advantages of its `_prepare_inputs`) against GRPOModule's
  real training step on the same tiny Qwen2, LoRA adapter, prompt and completion ids and rewards, at Tina's settings
  (parity/objective_tina.py, parity/objective_ours.py), twice: with GRPOModule's defaults (the policy pass shares
  each prompt's KV cache) and with gradient checkpointing as the Tina recipes train ("objective_checkpointing"). Passes when the advantages agree to float32 rounding
  (max abs diff <= 1e-6) and the loss and every LoRA gradient are within 1e-5 relative (a tensor's max abs
  difference over its max abs value).
- prompts: the prompt token ids (and golds) Tina's grpo.py + TRL build for rows of every dataset format of the
  registry against what ReasoningDataModule builds (parity/prompts_tina.py, parity/prompts_ours.py). Passes when
  every row's ids and gold are identical.
- rewards: parity/rewards_parity.py (Tina's reward functions against ours in Tina mode), when present.

Prints a summary and writes DIR/summary.json; exit status 1 if a part fails. CPU only, no network, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-5
ADV_TOL = 1e-6


def _run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(
            f"{' '.join(cmd[:2])} failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail)
        )


def compare_objective(work: Path, ours_file: str = "objective_ours.pt") -> dict[str, Any]:
    import torch

    tina = torch.load(work / "objective_tina.pt", weights_only=False)
    ours = torch.load(work / ours_file, weights_only=False)
    adv_t, adv_o = tina["advantages"].float(), ours["advantages"].float()
    loss_t, loss_o = float(tina["loss"]), float(ours["loss"])
    missing = sorted(set(tina["grads"]) ^ set(ours["grads"]))
    grad_rel = {}
    for name, g_t in tina["grads"].items():
        if name in ours["grads"]:
            g_o = ours["grads"][name].float()
            grad_rel[name] = float((g_o - g_t).abs().max() / g_t.abs().max().clamp(min=1e-30))
    worst = max(grad_rel, key=grad_rel.get)
    adv_diff = float((adv_o - adv_t).abs().max())
    loss_rel = abs(loss_o - loss_t) / max(abs(loss_t), 1e-30)
    return {
        "advantages_bitwise_equal": bool(torch.equal(adv_o, adv_t)),
        "advantages_max_abs_diff": adv_diff,
        "loss_tina": loss_t,
        "loss_ours": loss_o,
        "loss_rel_diff": loss_rel,
        "lora_tensors": len(grad_rel),
        "lora_tensors_missing": missing,
        "grad_max_rel_diff": grad_rel[worst],
        "grad_worst_tensor": worst,
        "pass": adv_diff <= ADV_TOL and loss_rel <= TOL and not missing and max(grad_rel.values()) <= TOL,
    }


def compare_prompts(work: Path) -> dict[str, Any]:
    tina = json.loads((work / "prompts_tina.json").read_text())
    ours = json.loads((work / "prompts_ours.json").read_text())
    formats = {}
    for name, t in tina.items():
        o = ours[name]["rows"]
        rows = t["rows"]
        same_ids = (
            sum(a["ids"] == b["ids"] for a, b in zip(rows, o, strict=False)) if len(o) == len(rows) else 0
        )
        same_gold = sum(a["solution"] == b["solution"] for a, b in zip(rows, o, strict=False))
        formats[name] = {
            "rows": len(rows),
            "ids_identical": same_ids,
            "gold_identical": same_gold,
            "tina_cut_rows": sum(r["cut"] for r in rows),
            "vllm_double_bos_rows": sum(r["vllm_ids"][:2] == [r["ids"][0]] * 2 for r in rows),
            "note": t["note"],
        }
    ok = all(f["ids_identical"] == f["rows"] == f["gold_identical"] for f in formats.values())
    return {"formats": formats, "pass": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tina-dir", type=Path, required=True, help="a checkout of shangshang-wang/Tina (read only)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="work and output folder (default: a new temp folder)"
    )
    p.add_argument("--only", default="objective,prompts,rewards", help="comma-separated parts to run")
    p.add_argument("--tina-python", type=Path, default=HERE / ".venv-tina" / "bin" / "python")
    p.add_argument("--python", type=Path, default=Path(sys.executable), help="the project's environment")
    p.add_argument(
        "--model", type=Path, default=ROOT / "data" / "tiny", help="tiny Qwen2 (weights, tokenizer)"
    )
    a = p.parse_args()
    if not a.tina_python.exists():
        raise SystemExit(f"{a.tina_python} not found: build Tina's environment with parity/setup_env.sh")
    if not (a.tina_dir / "tina" / "post_train_hf" / "grpo_trainer.py").is_file():
        raise SystemExit(f"--tina-dir {a.tina_dir}: not a checkout of shangshang-wang/Tina")
    out = a.out or Path(tempfile.mkdtemp(prefix="tina_parity_"))
    out.mkdir(parents=True, exist_ok=True)
    parts = set(a.only.split(","))
    tina_dir, model, fixtures = str(a.tina_dir.resolve()), str(a.model), str(ROOT / "tests/fixtures/datasets")
    summary: dict[str, Any] = {}
    if "objective" in parts:
        _run([str(a.tina_python), str(HERE / "objective_tina.py"), "--tina-dir", tina_dir, "--model", model,
              "--work", str(out)], out / "objective_tina.log")  # fmt: skip
        _run([str(a.python), str(HERE / "objective_ours.py"), "--model", model, "--work", str(out)],
             out / "objective_ours.log")  # fmt: skip
        _run([str(a.python), str(HERE / "objective_ours.py"), "--model", model, "--work", str(out),
              "--gradient-checkpointing"], out / "objective_ours_gc.log")  # fmt: skip
        summary["objective"] = compare_objective(out)
        summary["objective_checkpointing"] = compare_objective(out, "objective_ours_gc.pt")
    if "prompts" in parts:
        _run([str(a.tina_python), str(HERE / "prompts_tina.py"), "--tina-dir", tina_dir, "--model", model,
              "--fixtures", fixtures, "--work", str(out)], out / "prompts_tina.log")  # fmt: skip
        _run([str(a.python), str(HERE / "prompts_ours.py"), "--fixtures", fixtures, "--work", str(out)],
             out / "prompts_ours.log")  # fmt: skip
        summary["prompts"] = compare_prompts(out)
    if "rewards" in parts and (HERE / "rewards_parity.py").is_file():
        cmd = [str(a.python), str(HERE / "rewards_parity.py"), "--tina-dir", tina_dir, "--out", str(out / "rewards"),
               "--tina-python", str(a.tina_python), "--python", str(a.python)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        (out / "rewards.log").write_text(proc.stdout + proc.stderr)
        summary["rewards"] = {"pass": proc.returncode == 0, "report": str(out / "rewards" / "report.md")}
        print(proc.stdout.rstrip())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for part in ("objective", "objective_checkpointing"):
        if part not in summary:
            continue
        s = summary[part]
        print(
            f"{part}: advantages max |diff| {s['advantages_max_abs_diff']:.2e} "
            f"(bitwise equal: {s['advantages_bitwise_equal']}); loss {s['loss_tina']:.8g} vs {s['loss_ours']:.8g} "
            f"(rel {s['loss_rel_diff']:.2e}); {s['lora_tensors']} LoRA gradients, worst rel "
            f"{s['grad_max_rel_diff']:.2e} ({s['grad_worst_tensor']}) -> {'PASS' if s['pass'] else 'FAIL'}"
        )
    if "prompts" in summary:
        s = summary["prompts"]
        for name, f in s["formats"].items():
            extra = f"; {f['note']}" if f["note"] else ""
            print(
                f"prompts {name}: ids {f['ids_identical']}/{f['rows']}, gold {f['gold_identical']}/{f['rows']}, "
                f"rows TRL would cut {f['tina_cut_rows']}, vLLM double BOS {f['vllm_double_bos_rows']}{extra}"
            )
        print(f"prompts: {'PASS' if s['pass'] else 'FAIL'}")
    print(f"details: {out}")
    if not all(v["pass"] for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
