"""AdapterCheckpoint: the trained LoRA adapter in standard PEFT layout, every N steps, kept last-K and best-K.

Each checkpoint is a folder that `PeftModel.from_pretrained(base, folder)` and vLLM's `LoRARequest` load directly:
adapter_model.safetensors, adapter_config.json, the tokenizer, and lightning_tina.json (step, metrics, run config).
It is written under a temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from lightning_tina.callbacks._period import train_step_period
from lightning_tina.policy import full_trainable_state

META_FILE = "lightning_tina.json"


class AdapterCheckpoint(Checkpoint):
    """Save the adapter every `every_n_train_steps` optimizer steps and at the end of fit.

    A Checkpoint subclass, so Lightning runs it after the other callbacks (a fresh benchmark score can be monitored).

    Args:
        dirpath: folder for the checkpoints; None puts them in the logger's run folder under `adapters/`.
        every_n_train_steps: save period in optimizer steps (0: only at the end; the CLI's
            checkpoint.every_n_train_steps sets it for a recipe).
        keep_last: keep this many most recent checkpoints (0 keeps all).
        monitor: a logged metric (e.g. "bench/aime24/pass@1") to keep the best checkpoints by; None: no best-K.
        mode: "max" or "min" for `monitor`.
        keep_best: keep this many best checkpoints by `monitor`, besides the last ones.
        every_n_steps: the old name of every_n_train_steps (still accepted, with a warning).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        keep_last: int = 3,
        monitor: str | None = None,
        mode: str = "max",
        keep_best: int = 1,
        every_n_steps: int | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"AdapterCheckpoint mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = dirpath
        self.every_n_train_steps = train_step_period(
            "AdapterCheckpoint", every_n_train_steps, every_n_steps, 50
        )
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.saved: list[tuple[int, float | None]] = []  # (step, monitored value) of every checkpoint on disk

    def _root(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = (
            trainer.logger.log_dir if trainer.logger and trainer.logger.log_dir else trainer.default_root_dir
        )
        return Path(base) / "adapters"

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the adapter of the current step; returns its folder."""
        step = trainer.global_step
        root = self._root(trainer)
        final = root / f"step-{step:06d}"
        tmp = root / f".step-{step:06d}.tmp"
        gathered = full_trainable_state(pl_module.policy)  # FSDP2: every rank takes part in the gather
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            pl_module.policy.save_pretrained(tmp, state_dict=gathered)
            pl_module.tokenizer.save_pretrained(tmp)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            meta = {
                "step": step,
                "base_model": pl_module.model_name,
                "metrics": metrics,
                "config": dict(pl_module.hparams),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            value = metrics.get(self.monitor) if self.monitor else None
            self.saved = [s for s in self.saved if s[0] != step] + [(step, value)]
            self._prune(root)
        trainer.strategy.barrier()
        return final

    def _prune(self, root: Path) -> None:
        keep = {s for s, _ in self.saved[-self.keep_last :]} if self.keep_last else {s for s, _ in self.saved}
        if self.monitor:
            scored = [(s, v) for s, v in self.saved if v is not None and not math.isnan(v)]
            scored.sort(key=lambda sv: sv[1], reverse=self.mode == "max")
            keep |= {s for s, _ in scored[: self.keep_best]}
        for step, _ in list(self.saved):
            if step not in keep:
                shutil.rmtree(root / f"step-{step:06d}", ignore_errors=True)
        self.saved = [sv for sv in self.saved if sv[0] in keep]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # decided from the step alone, never from `saved` (kept on rank 0 only): under FSDP2 every rank must
        # enter save() together, because it gathers the sharded adapter
        if not self._due(trainer):
            self.save(trainer, pl_module)

    def _due(self, trainer: L.Trainer) -> bool:
        return bool(self.every_n_train_steps) and trainer.global_step % self.every_n_train_steps == 0

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = [tuple(s) for s in state_dict.get("saved", [])]
