"""Objective parity, lightning_tina's side: one real `GRPOModule` training step on the case that
parity/objective_tina.py wrote. Runs in the project's environment.

A one-step `Trainer.fit` with the case's prompt ids as the batch, a rollout source that replays the case's completion
ids, and reward functions that replay the case's per-completion values; a callback keeps the LoRA gradients right
before the optimizer step. Everything GRPOModule-specific is in `attach_replay` and `record_advantages` below.
Output: WORK/objective_ours.pt (advantages, loss, LoRA gradients), or WORK/objective_ours_gc.pt with
--gradient-checkpointing (the Tina recipes' setting).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_tina import grpo as grpo_functions
from lightning_tina.grpo import GRPOSettings
from lightning_tina.module import GRPOModule
from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings
from lightning_tina.rewards import RewardSpec, register_reward
from lightning_tina.types import Generation, PromptBatch


@register_reward("parity_replay_format")
def replay_format(completions: list[str], *, r_format: list[Any], **_: Any) -> list[float | None]:
    """The case's format values: each row carries its group's list (one group per call, scope "group")."""
    return list(r_format[0])


@register_reward("parity_replay_accuracy")
def replay_accuracy(completions: list[str], *, r_accuracy: list[Any], **_: Any) -> list[float | None]:
    return list(r_accuracy[0])


# ---- the coupling to GRPOModule's internals (all of it) -----------------------------------------------------------


class _LegacyReplay:
    """The rollout object GRPOModule read as `module.rollout` before the RolloutSource interface (issue 19)."""

    def __init__(self, generations: list[Generation], group_size: int, max_new_tokens: int) -> None:
        from lightning_tina.rollout.base import SamplingConfig

        self.generations, self.group_size = generations, group_size
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def rollouts_for(self, batch: PromptBatch, module: Any):
        from lightning_tina.rollout.batch import make_rollouts

        return make_rollouts(batch, self.generations, self.group_size, module.tokenizer)


def attach_replay(
    module: GRPOModule, generations: list[Generation], group_size: int, max_new_tokens: int
) -> None:
    """Make `module` train on these fixed completions: `connect_rollouts(ReplayRollouts)` where the module has the
    RolloutSource seam, else the older `module.rollout` attribute with `rollouts_for(batch, module)`."""
    if hasattr(module, "connect_rollouts"):
        from lightning_tina.rollout.source import ReplayRollouts

        module.connect_rollouts(ReplayRollouts([generations], group_size, max_new_tokens))
    else:
        module.rollout = _LegacyReplay(generations, group_size, max_new_tokens)


@contextlib.contextmanager
def record_advantages(into: list[torch.Tensor]) -> Iterator[None]:
    """Keep what `lightning_tina.grpo.group_advantages` returns while the step runs (the module calls it once)."""
    original = grpo_functions.group_advantages

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        into.append(out.detach().clone())
        return out

    grpo_functions.group_advantages = recording
    try:
        yield
    finally:
        grpo_functions.group_advantages = original


# -------------------------------------------------------------------------------------------------------------------


class _GradsBeforeStep(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {
            n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="tiny Qwen2 directory (data/tiny)")
    ap.add_argument("--work", required=True, help="directory holding objective_case.pt")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="as the Tina recipes train (the policy pass then runs whole sequences instead of sharing the prompt)",
    )
    args = ap.parse_args()
    work = Path(args.work)
    case_file = torch.load(work / "objective_case.pt", weights_only=False)
    case, g = case_file["case"], case_file["group_size"]
    lora = case_file["lora"]
    weights = case_file["reward_weights"]
    torch.manual_seed(0)
    module = GRPOModule(
        model=args.model,
        lora=LoRASettings(
            r=lora["r"], alpha=lora["alpha"], dropout=0.0, target_modules=list(lora["targets"])
        ),
        grpo=GRPOSettings(  # Tina's settings (configs/tina/base.yaml), one optimizer step over B groups
            num_generations=g,
            batch_size=g * len(case["problems"]),
            micro_batch_size=g,
            beta=0.04,
            temperature=0.7,
            logprob_temperature=1.0,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            max_grad_norm=0.0,  # no clipping: the gradients are compared as computed
            gradient_checkpointing=args.gradient_checkpointing,
        ),
        optim=OptimSettings(lr=1e-6, weight_decay=0.0),
        rewards=[
            RewardSpec(name="parity_replay_format", weight=weights[0]),
            RewardSpec(name="parity_replay_accuracy", weight=weights[1]),
        ],
        dtype="float32",
        attn_implementation="sdpa",
    )
    module.configure_model()
    params = dict(module.policy.named_parameters())
    with torch.no_grad():
        for name, value in case_file["adapter"].items():
            params[name].copy_(value)
    generations = [
        Generation(
            token_ids=list(c),
            logprobs=None,
            finish_reason="length" if len(c) >= case_file["max_completion"] else "stop",
        )
        for c in case["completions"]
    ]
    attach_replay(module, generations, g, case_file["max_completion"])
    rows = [
        {
            "problem": p,
            "solution": "$0$",
            "r_format": case["r_format"][b],
            "r_accuracy": case["r_accuracy"][b],
        }
        for b, p in enumerate(case["problems"])
    ]
    batch = PromptBatch(
        prompt_ids=[list(p) for p in case_file["prompt_ids"]],
        rows=rows,
        position=None,
    )
    grads = _GradsBeforeStep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[grads],
    )
    advantages: list[torch.Tensor] = []
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda x: x)
    with record_advantages(advantages):
        trainer.fit(module, train_dataloaders=loader)
    loss = trainer.logged_metrics["train/loss"]
    lora_grads = {n: t for n, t in grads.grads.items() if "lora_" in n}
    name = "objective_ours_gc.pt" if args.gradient_checkpointing else "objective_ours.pt"
    torch.save({"advantages": advantages[0], "loss": loss, "grads": lora_grads}, work / name)
    print(
        f"ours ({name}): loss {float(loss):.6g}, {len(lora_grads)} LoRA gradients, advantages {advantages[0]}"
    )


if __name__ == "__main__":
    main()
