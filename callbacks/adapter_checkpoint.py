"""AdapterCheckpoint: the trained LoRA adapter in standard PEFT layout, every N steps, kept last-K and best-K.

Each checkpoint is a folder that `PeftModel.from_pretrained(base, folder)` and vLLM's `LoRARequest` load directly:
adapter_model.safetensors, adapter_config.json, the tokenizer, and lightning_tina.json (step, metrics, run config).
It is written under a temporary name and renamed, so a crash never leaves a half-written checkpoint behind.

A population (`model.population`) gives each adapter its own history: `<root>/<name>/step-XXXXXX/`, the same layout,
with lightning_tina.json naming the adapter and holding its own metrics (its `/<name>` tags without the suffix, and
the shared untagged ones); `monitor`, keep_last and keep_best apply per adapter (`bench/<b>/pass@1/<name>`).
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
from lightning_tina.population import SOLO, Member

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
            A population monitors each adapter's own tag of it (`bench/aime24/pass@1/<name>`).
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
        # per adapter ("default" in a solo run): (step, monitored value) of every checkpoint on disk
        self.histories: dict[str, list[tuple[int, float | None]]] = {}

    def _root(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = (
            trainer.logger.log_dir if trainer.logger and trainer.logger.log_dir else trainer.default_root_dir
        )
        return Path(base) / "adapters"

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the adapter of the current step (a population: every adapter's, each into its own history);
        returns its folder (a population: the first adapter's)."""
        step = trainer.global_step
        root = self._root(trainer)
        names = [m.name for m in pl_module.members]
        # each member's history folder: a solo run's (tag None) is the root itself
        targets = [(m, root if m.tag is None else root / m.name) for m in pl_module.members]
        gathered = full_trainable_state(pl_module.policy)  # FSDP2: every rank takes part in the gather, once
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            for member, folder in targets:
                self._write(pl_module, gathered, member, folder, step, _own_metrics(metrics, member, names))
                value = metrics.get(member.metric(self.monitor)) if self.monitor else None
                history = [s for s in self.histories.get(member.name, []) if s[0] != step] + [(step, value)]
                self.histories[member.name] = self._prune(folder, history)
        trainer.strategy.barrier()
        return targets[0][1] / f"step-{step:06d}"

    def _write(
        self,
        pl_module: L.LightningModule,
        gathered: dict[str, Any] | None,
        member: Member,
        folder: Path,
        step: int,
        metrics: dict[str, float],
    ) -> None:
        """One adapter's checkpoint, written under a temporary name and renamed into `folder/step-XXXXXX`."""
        final = folder / f"step-{step:06d}"
        tmp = folder / f".step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta: dict[str, Any] = {"step": step, "base_model": pl_module.model_name}
        if member.tag is None:
            pl_module.policy.save_pretrained(tmp, state_dict=gathered)
            written = tmp
        else:  # PEFT writes a non-"default" adapter into `tmp/<name>/`
            pl_module.policy.save_pretrained(tmp, selected_adapters=[member.name], state_dict=gathered)
            written = tmp / member.name
            meta["adapter"] = member.name
        pl_module.tokenizer.save_pretrained(written)
        meta.update(metrics=metrics, config=dict(pl_module.hparams))
        (written / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(tmp, ignore_errors=True)  # a population's emptied staging folder

    def _prune(self, folder: Path, history: list[tuple[int, float | None]]) -> list[tuple[int, float | None]]:
        """Delete the checkpoints of `history` (one adapter's, in `folder`) that neither keep_last nor keep_best
        keeps; returns the kept part."""
        keep = {s for s, _ in history[-self.keep_last :]} if self.keep_last else {s for s, _ in history}
        if self.monitor:
            scored = [(s, v) for s, v in history if v is not None and not math.isnan(v)]
            scored.sort(key=lambda sv: sv[1], reverse=self.mode == "max")
            keep |= {s for s, _ in scored[: self.keep_best]}
        for step, _ in history:
            if step not in keep:
                shutil.rmtree(folder / f"step-{step:06d}", ignore_errors=True)
        return [sv for sv in history if sv[0] in keep]

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

    @property
    def saved(self) -> list[tuple[int, float | None]]:
        """(step, monitored value) of every checkpoint on disk of a solo run (a population's: `histories`)."""
        return self.histories.get(SOLO, [])

    def state_dict(self) -> dict[str, Any]:
        by_adapter = {n: list(h) for n, h in self.histories.items() if n != SOLO}
        return {"saved": list(self.saved), "saved_by_adapter": by_adapter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Per-adapter histories; a solo checkpoint's state (only `saved`) loads as before."""
        saved = [tuple(s) for s in state_dict.get("saved", [])]
        self.histories = {SOLO: saved} if saved else {}
        for name, history in state_dict.get("saved_by_adapter", {}).items():
            self.histories[name] = [tuple(s) for s in history]


def _own_metrics(metrics: dict[str, float], member: Member, names: list[str]) -> dict[str, float]:
    """A population member's metrics: its own tags without the `/<name>` suffix, and the untagged (shared) ones; a
    solo run's: all of them."""
    if member.tag is None:
        return metrics
    suffix = member.metric("")  # "/<name>"
    own = {k[: -len(suffix)]: v for k, v in metrics.items() if k.endswith(suffix)}
    shared = {k: v for k, v in metrics.items() if not any(k.endswith(f"/{n}") for n in names)}
    return {**shared, **own}
