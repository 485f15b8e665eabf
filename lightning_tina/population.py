"""Population runs: several named LoRA adapters on one frozen base, trained together in one GRPOModule.

A population is a list of members (`model.population`), each an adapter with its own LoRA settings, optimizer
settings and initialization seed, written as overrides of the shared `model.lora` and `model.optim`. Everything else
is shared: the base weights (one copy), the prompt stream (every adapter answers the same prompts each step: a
paired comparison), the rewards, the GRPO settings and the rollout engine.

Per step the module samples every adapter's completions in ONE rollout call (prompts laid out adapter-major, each
naming its adapter), then runs each adapter's GRPO update on its own rows: its groups, advantages, reference and
policy passes, loss, gradient clipping, NaN skipping, optimizer and schedule. An adapter's gradients come only
from its own rows (the base is frozen and adapters never share a forward), so members do not influence each other's
updates within a step.

Steps: `trainer.global_step` (max_steps, the checkpoint and evaluation periods, the TensorBoard x axis) counts
optimizer steps as in a solo run, i.e. the FIRST adapter's: every adapter steps its own optimizer each training step,
the others through the strategy without being counted. As in a solo run, an update skipped for a NaN/inf loss is
not counted, so a skipped update of the first adapter makes that training step uncounted for all.

Distributed: under DDP each adapter's gradients are averaged over the ranks by the module itself (DDP's reducer
expects every trainable weight in one backward, and each adapter has its own); FSDP2 needs nothing extra.

This file holds the settings (`AdapterSettings`, resolved into `Member`s), building the adapters into one PEFT model,
switching the trained adapter (`activate`), and routing rows of one generation batch to different adapters
(`routed`, what the Hugging Face engine uses for a mixed-adapter batch).
"""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings, lora_config, wrap_lora

SOLO = "default"
"""The adapter name of a run without `model.population` (PEFT's own default name)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class AdapterSettings:
    """One member of `model.population`: an adapter trained beside the others on the same base and prompts."""

    name: str
    """Unique name: the TensorBoard tag suffix (`train/reward/<name>`), the checkpoint folder (`adapters/<name>/`)
    and the PEFT adapter name. Letters, digits, `_` and `-`."""
    lora: dict[str, Any] = field(default_factory=dict)
    """Overrides of `model.lora` for this adapter, e.g. `{r: 8, alpha: 32}` (rank, alpha, dropout,
    target_modules; `enabled` and `fused` are shared)."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of `model.optim` for this adapter, e.g. `{lr: 5.0e-6}` (any OptimSettings field)."""
    seed: int | None = None
    """Seed of this adapter's initialization (LoRA A); None draws it from the run's seeded stream, in member order
    (a population of one then initializes exactly as the solo run)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"model.population: adapter name {self.name!r} must start with a letter or digit and hold only "
                "letters, digits, '_' and '-' (it names a folder and a TensorBoard tag)"
            )
        if self.name in "lora_" or self.name == SOLO:  # PEFT finds adapters by name in `lora_A.<name>` etc.
            raise ValueError(
                f"model.population: adapter name {self.name!r} is PEFT's default name or part of its prefix "
                "'lora_'; choose another"
            )


@dataclass(frozen=True)
class Member:
    """A resolved population member: the shared settings with its overrides applied."""

    name: str
    """PEFT adapter name (SOLO for a run without a population)."""
    lora: LoRASettings
    """model.lora with this member's overrides."""
    optim: OptimSettings
    """model.optim with this member's overrides."""
    seed: int | None
    """Its initialization seed (None: the run's seeded stream, in member order)."""
    tag: str | None
    """Suffix of its TensorBoard tags and checkpoint folder; None for a solo run (tags and folders unchanged)."""

    def metric(self, key: str) -> str:
        """`key` for this member: `train/reward` -> `train/reward/<name>` (unchanged for a solo run)."""
        return key if self.tag is None else f"{key}/{self.tag}"


_SHARED_LORA = ("enabled", "fused")


def resolve_population(
    population: Sequence[AdapterSettings] | None, lora: LoRASettings, optim: OptimSettings
) -> list[Member]:
    """The members of a run: one unnamed SOLO member without `population`, else one per entry (overrides applied
    to `lora` and `optim`, each checked as the section it overrides)."""
    if population is None:
        return [Member(SOLO, lora, optim, None, None)]
    if not population:
        raise ValueError("model.population is empty: list at least one adapter, or leave it out (null)")
    if not lora.enabled:
        raise ValueError(
            "model.population trains several LoRA adapters on one frozen base: it needs model.lora.enabled: true"
        )
    names = [a.name for a in population]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model.population: adapter names must be unique, {repeated} repeat")
    return [
        Member(
            a.name,
            _override(lora, a.lora, f"model.population[{a.name}].lora", exclude=_SHARED_LORA),
            _override(optim, a.optim, f"model.population[{a.name}].optim"),
            a.seed,
            a.name,
        )
        for a in population
    ]


def _override(settings: Any, overrides: dict[str, Any], where: str, exclude: Sequence[str] = ()) -> Any:
    """`settings` with `overrides` applied (the dataclass re-checks its fields); unknown or shared keys refused."""
    allowed = [f.name for f in fields(settings) if f.name not in exclude]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown or shared keys {unknown}; an adapter may set {allowed}")
    values = dict(overrides)
    if "betas" in values:  # YAML gives a list
        values["betas"] = tuple(values["betas"])
    try:
        return replace(settings, **values)
    except ValueError as err:  # the section's own message, under this member's key
        raise ValueError(f"{where}: {err}") from None


def members_hparams(members: Sequence[Member]) -> list[dict[str, Any]] | None:
    """What checkpoints record of the population (None for a solo run)."""
    if members[0].tag is None:
        return None
    return [
        {"name": m.name, "lora": asdict(m.lora), "optim": asdict(m.optim), "seed": m.seed} for m in members
    ]


# ---- the adapters in one PEFT model -------------------------------------------------------------------------------


def build_adapters(base: nn.Module, members: Sequence[Member]) -> nn.Module:
    """Wrap `base` with every member's adapter (PEFT, one model); all adapter weights trainable, the first active.

    A member with a seed initializes from that seed (the global RNG is left as it was); without one it draws from
    the global RNG, so a population of one without a seed equals the solo run."""
    configs = [lora_config(m.lora, base) for m in members]  # checked against the bare model's layers
    policy: nn.Module | None = None
    for m, config in zip(members, configs, strict=True):
        with _seeded(m.seed):
            if policy is None:
                policy = wrap_lora(base, m.lora, adapter_name=m.name)
            else:
                policy.add_adapter(m.name, config)
    assert policy is not None
    if len(members) > 1 and members[0].lora.fused:
        from lightning_tina.fused_lora import install_fused_lora

        install_fused_lora(policy)  # the layers that only later adapters target
    activate(policy, members[0].name)
    return policy


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def adapter_parameters(policy: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable weights of adapter `name`, in module order."""
    marker = f".{name}."
    return [p for n, p in policy.named_parameters() if "lora_" in n and marker in n]


def activate(policy: nn.Module, name: str) -> None:
    """Make adapter `name` the one that forwards run through. PEFT's `set_adapter` also freezes the other adapters;
    they stay trainable here (each has its own optimizer, and checkpoints keep every trainable weight)."""
    if policy.active_adapter != name:
        policy.set_adapter(name)
    for n, p in policy.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)


def adapter_major(names: Sequence[str], per_adapter: int) -> list[str]:
    """The adapter of each item of a batch laid out adapter-major (`per_adapter` items of names[0], then of
    names[1], ...): the `adapters` argument of a population's rollout, generate and evaluation calls."""
    return [name for name in names for _ in range(per_adapter)]


def adapter_runs(adapters: Sequence[str]) -> list[tuple[str, int, int]]:
    """Consecutive runs of equal names: [(name, start, end)] over the indices of `adapters`."""
    runs: list[tuple[str, int, int]] = []
    for i, a in enumerate(adapters):
        if runs and runs[-1][0] == a:
            runs[-1] = (a, runs[-1][1], i + 1)
        else:
            runs.append((a, i, i + 1))
    return runs


# ---- a mixed-adapter batch (generation) ---------------------------------------------------------------------------


@contextlib.contextmanager
def routed(policy: nn.Module, runs: Sequence[tuple[str, int, int]]) -> Iterator[None]:
    """Inside: every forward of `policy` runs rows [start, end) of its batch through adapter `name`, for each run
    (`adapter_runs` of the rows; the base layer runs once for the whole batch). For generation: `generate` keeps
    its batch rows in place from the first step to the last.

    PEFT offers the same through `adapter_names=[...]` (refused in training mode); this indexes contiguous row
    slices (views) instead of gathering each adapter's rows, and runs under lightning_tina's fused forward too."""
    from peft.tuners.lora.layer import Linear as LoRALinear

    saved = []
    for module in policy.modules():
        if isinstance(module, LoRALinear):
            saved.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(_routed_forward, module)
            module._lt_runs = list(runs)
    try:
        yield
    finally:
        for module, forward in saved:
            del module._lt_runs
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _routed_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA layer's forward for a batch whose rows belong to different adapters (`routed`)."""
    out = self.base_layer(x, *args, **kwargs)  # [b, T, out]
    if self.disable_adapters or self.merged:
        return out
    for name, start, end in self._lt_runs:
        if name not in self.lora_A:  # this adapter does not target this layer
            continue
        a, b = self.lora_A[name], self.lora_B[name]
        xs = self.lora_dropout[name](x[start:end].to(a.weight.dtype))  # [b', T, in]
        out[start:end] += (b(a(xs)) * self.scaling[name]).to(out.dtype)  # [b', T, out]
    return out


# ---- TensorBoard ---------------------------------------------------------------------------------------------------

COMPARED = (
    "train/reward",
    "train/loss",
    "train/kl",
    "train/entropy",
    "train/grad_norm",
    "train/lr",
    "train/completion_length_mean",
    "train/clip_high",
)
"""The training statistics that the comparison view draws with one line per adapter."""


def comparison_layout() -> dict[str, dict[str, list[Any]]]:
    """A TensorBoard Custom Scalars layout: one chart per statistic (and per benchmark's pass@1) holding every
    adapter's line, matched by the `/<name>` tag suffix."""
    charts: dict[str, list[Any]] = {key: ["Multiline", [rf"^{re.escape(key)}/[^/]+$"]] for key in COMPARED}
    charts["bench pass@1"] = ["Multiline", [r"^bench/[^/]+/pass@1/[^/]+$"]]
    charts["val pass@1"] = ["Multiline", [r"^val/pass@1/[^/]+$"]]
    return {"population": charts}
