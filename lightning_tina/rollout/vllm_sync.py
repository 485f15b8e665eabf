"""How the policy's weights reach the colocated vLLM engine: a LoRA adapter, or merged / full weights in place.

`WeightSync.snapshot(policy)` runs in `VLLMEngine.sync` and copies what vLLM will need, so that later optimizer
steps cannot change it; `WeightSync.push(llm)` runs at the start of the next `generate` and loads the copy.

- "lora": the adapter alone (a few MB) is served through a `LoRARequest` with a NEW `lora_int_id` and name every
  version. vLLM silently keeps serving an adapter whose id it has seen, and its prefix cache is keyed by the
  adapter's name and path, so reusing either would sample from a stale policy. A population (`adapters`, several
  named adapters of one PEFT model) is the same thing K times: every version snapshots each named adapter and
  serves it under its own fresh id; a solo run is the one-entry case (the policy's active adapter).
- "merged": the adapter is merged into full weights, W' = W + s * B @ A (s = PEFT's per-module `scaling`, i.e.
  lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA), in float32 from the policy's own tensors (the policy is
  not modified), and loaded in place into the engine's model, which runs without any LoRA machinery.
- a policy that is not a PEFT model (full fine-tuning): all its weights are loaded in place.

In-place loads use vLLM's layerwise reload with checkpoint (Hugging Face) names; a layer is rebuilt once all its
tensors arrived, so every fused layer (q/k/v, gate/up) must be sent whole. "merged" therefore sends every linear
layer (weights and biases) of each block that holds a LoRA target, and nothing else: the rest is the frozen base,
which the engine loaded from the same checkpoint at start. The prefix cache is reset after every load, since its
KV blocks were computed with the old weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tina.policy import (
    whole,  # FSDP2 shards: every rank's engine syncs at the same point of the step
)
from lightning_tina.rollout.vllm_worker import add_lora_from_tensors

WeightSyncMethod = Literal["lora", "merged"]
AdapterTransport = Literal["files", "tensors"]

# vLLM warns on every partial in-place reload about the layers it was not sent; "merged" skips them on purpose.
_PARTIAL_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)


@dataclass(eq=False, repr=False)  # compared by identity, and no repr of the (large) pending snapshot
class WeightSync:
    """Snapshots the policy at `sync` time and loads the snapshot into vLLM before the next generation.

    Args:
        method: "lora" (serve the adapter) or "merged" (merge it into full weights) for PEFT policies.
        transport: "lora" only: "files" (safetensors that vLLM loads by path) or "tensors" (handed in memory to
            the in-process worker).
        max_lora_rank: the engine's largest servable rank ("lora" only).
        dtype: the engine's dtype; merged weights are rounded to it once, after the float32 merge.
        adapter_dir: where "files" writes adapters (None: /dev/shm when writable, else the temp folder).
        adapters: a population's adapter names (`EngineSpec.adapters`): every `snapshot` copies each of them by
            name. () (a solo run): the policy's one active adapter. "merged" takes at most one name.
    """

    method: WeightSyncMethod
    transport: AdapterTransport
    max_lora_rank: int
    dtype: torch.dtype
    adapter_dir: str | None = None
    adapters: tuple[str, ...] = ()
    lora_requests: dict[str, Any] = field(default_factory=dict, init=False)
    """The served LoRARequest of each adapter, by PEFT adapter name (empty when the engine serves plain weights);
    a solo run has one entry, its active adapter."""
    # ("files", {adapter: folder}), ("tensors", {adapter: (tensors, config)}), ("weights", [(hf_name, tensor)])
    # (all of them) or ("merged", [(hf_name, tensor)]) (the blocks with LoRA targets)
    _pending: tuple[str, Any] | None = field(default=None, init=False)
    _lora_id: int = field(default=0, init=False)  # a fresh vLLM adapter id for every adapter of every version
    _adapter_root: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.method == "merged" and len(self.adapters) > 1:
            raise ValueError(
                f"rollout.vllm.weight_sync='merged' cannot serve a population of {len(self.adapters)} adapters "
                "(one merged weight set holds one adapter); use weight_sync: lora."
            )

    @property
    def lora_request(self) -> Any:
        """The LoRARequest of the only served adapter (None when plain or merged weights are served); a solo
        run's, or a population of one's. Several adapters are served by name (`lora_requests`)."""
        if len(self.lora_requests) > 1:
            raise RuntimeError(
                f"the engine serves {len(self.lora_requests)} adapters; name one per prompt (generate's adapters)."
            )
        return next(iter(self.lora_requests.values()), None)

    def snapshot(self, policy: torch.nn.Module) -> None:
        """Copy what the next `push` loads; a snapshot that was never pushed is dropped."""
        from peft import PeftModel

        self.drop_pending()
        if not isinstance(policy, PeftModel):
            if self.adapters:
                raise ValueError(
                    f"sync: the engine serves the population adapters {list(self.adapters)} but the policy is a "
                    f"{type(policy).__name__}, not a PEFT model holding them."
                )
            # [name -> tensor] copies on CPU so the trainer's next step cannot change them before generate
            weights = [(k, whole(v).detach().to("cpu", copy=True)) for k, v in policy.state_dict().items()]
            self._pending = ("weights", weights)
            return
        names = self.adapters or (_active_adapter(policy),)
        missing = [n for n in names if n not in policy.peft_config]
        if missing:
            raise ValueError(
                f"sync: the policy has no adapter named {missing}; it holds {sorted(policy.peft_config)}."
            )
        for name in names:
            check_lora_config(
                policy.peft_config[name],
                self.max_lora_rank if self.method == "lora" else None,
                name if self.adapters else None,
            )
        if self.method == "merged":
            self._pending = ("merged", merged_lora_weights(policy, names[0], self.dtype))
        else:
            payload: dict[str, Any] = {}
            self._pending = (self.transport, payload)  # filled below; a failure drops (deletes) what was made
            try:
                for name in names:
                    payload[name] = self._snapshot_adapter(policy, name, policy.peft_config[name])
            except BaseException:
                self.drop_pending()
                raise

    def push(self, llm: Any, lora_enabled: bool) -> None:
        """Load the pending snapshot into `llm` (an awake in-process `vllm.LLM`) and release the old version."""
        if self._pending is None:
            return
        kind, payload = self._pending
        if kind in ("weights", "merged"):
            load_weights_in_place(llm, payload, partial=kind == "merged")
            self._pending = None
            self.lora_requests = {}  # the reload also dropped any adapter
            return
        if not lora_enabled:
            raise RuntimeError(
                "sync: the engine was started without LoRA (full fine-tuning or weight_sync='merged') and cannot "
                "serve an adapter."
            )
        from vllm.lora.request import LoRARequest

        old = list(self.lora_requests.values())
        served: dict[str, Any] = {}
        for adapter, item in payload.items():
            self._lora_id += 1
            # A new name too: the prefix cache is keyed by name and path. "policy-<id>" for a solo run.
            name = f"{adapter if self.adapters else 'policy'}-{self._lora_id}"
            if kind == "tensors":
                tensors, cfg = item
                llm.collective_rpc(add_lora_from_tensors, args=(self._lora_id, tensors, cfg))
                served[adapter] = LoRARequest(name, self._lora_id, f"in-memory://{name}")
            else:
                served[adapter] = LoRARequest(name, self._lora_id, item)
                llm.llm_engine.add_lora(served[adapter])
        self.lora_requests = served
        for request in old:
            # usually already evicted: vLLM keeps max_cpu_loras (the number of adapters) and the new ones came last
            llm.llm_engine.remove_lora(request.lora_int_id)
            if not request.lora_path.startswith("in-memory://"):
                shutil.rmtree(request.lora_path, ignore_errors=True)
        reset_prefix_cache(llm)  # blocks computed under the old adapters are useless now
        self._pending = None

    def drop_pending(self) -> None:
        """Forget a snapshot that was never pushed (and delete its files)."""
        if self._pending is not None and self._pending[0] == "files":
            for path in self._pending[1].values():
                shutil.rmtree(path, ignore_errors=True)
        self._pending = None

    def close(self) -> None:
        """Delete the adapter files."""
        self.drop_pending()
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
            self._adapter_root = None

    @property
    def adapter_root(self) -> Path | None:
        """The folder of the "files" transport's adapters (None before the first one)."""
        return self._adapter_root

    def _snapshot_adapter(self, policy: Any, name: str, cfg: Any) -> Any:
        """Copy the adapter `name`'s tensors (on CPU, with its config as a dict) or save them as a folder (its
        path), for "lora"."""
        from peft import get_peft_model_state_dict

        # {"base_model.model.<module>.lora_A.weight": [r, in], ...lora_B.weight: [out, r]}
        state = {k: whole(v) for k, v in get_peft_model_state_dict(policy, adapter_name=name).items()}
        if self.transport == "tensors":
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}, cfg.to_dict()
        from safetensors.torch import save_file

        if self._adapter_root is None:
            base = self.adapter_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
            self._adapter_root = Path(tempfile.mkdtemp(prefix="tina-adapters-", dir=base))
        path = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._adapter_root))
        cfg.save_pretrained(str(path))  # adapter_config.json
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
            str(path / "adapter_model.safetensors"),
        )
        return str(path)


def merged_lora_weights(policy: Any, adapter: str, dtype: torch.dtype) -> list[tuple[str, Tensor]]:
    """Checkpoint-named CPU copies of every linear layer in the blocks that hold a LoRA target, adapter merged.

    W' = W + s * B @ A in float32 (A: [r, in], B: [out, r], s: the module's PEFT scaling), then rounded to
    `dtype`; biases are copied as they are. The policy is left untouched (no merge_and_unload). Layers are listed
    block by block, the order in which vLLM can rebuild each one as soon as it is complete.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    modules = dict(base.named_modules())
    targets = [n for n, m in modules.items() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    if not targets:
        raise ValueError(f"sync: the policy's adapter {adapter!r} has no LoRA layers to merge.")
    out: list[tuple[str, Tensor]] = []
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in targets):
        for child_name, child in modules[parent].named_children():
            full = f"{parent}.{child_name}" if parent else child_name
            if isinstance(child, LoraLayer):
                if not isinstance(child, LoraLinear):
                    raise ValueError(
                        f"sync: VLLMConfig.weight_sync='merged' merges LoRA on linear layers only, but {full} is "
                        f"a {type(child).__name__}; use weight_sync='lora' or target linear layers only."
                    )
                layer = child.get_base_layer()
                weight = whole(layer.weight).detach().float()  # [out, in]
                if adapter in child.lora_A and adapter not in child.merged_adapters:
                    a = whole(child.lora_A[adapter].weight).detach().float()  # [r, in]
                    b = whole(child.lora_B[adapter].weight).detach().float()  # [out, r]
                    delta = child.scaling[adapter] * (b @ a)  # [out, in]
                    weight = weight + (delta.T if child.fan_in_fan_out else delta)
            elif isinstance(child, torch.nn.Linear):
                layer, weight = child, whole(child.weight).detach()
            else:
                continue
            out.append((f"{full}.weight", weight.to("cpu", dtype, copy=True)))
            if layer.bias is not None:
                out.append((f"{full}.bias", whole(layer.bias).detach().to("cpu", dtype, copy=True)))
    return out


class _DropPartialReloadNotices(logging.Filter):
    """Drops vLLM's notices about layers that a partial in-place reload did not receive."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (
            msg.startswith("Following weights were not loaded") or msg.endswith("Failed to load weights")
        )


def load_weights_in_place(llm: Any, weights: list[tuple[str, Tensor]], partial: bool = False) -> None:
    """Load checkpoint-named `weights` into the in-process engine's model (layers not sent keep their values),
    then reset the prefix cache. `partial`: some layers are left out on purpose (no notice about them)."""
    notice_filter = _DropPartialReloadNotices()
    loggers = [logging.getLogger(n) for n in _PARTIAL_RELOAD_LOGGERS] if partial else []
    for lg in loggers:
        lg.addFilter(notice_filter)
    try:
        llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=iter(weights), is_checkpoint_format=True)
        )
    finally:
        for lg in loggers:
            lg.removeFilter(notice_filter)
    reset_prefix_cache(llm)


def reset_prefix_cache(llm: Any) -> None:
    """Drop every cached KV block: they were computed with the previous weights."""
    if llm.reset_prefix_cache() is False:
        raise RuntimeError(
            "vLLM refused to reset its prefix cache (requests still running); cannot sync weights."
        )


def _active_adapter(policy: Any) -> str:
    names = list(policy.active_adapters)
    if len(names) != 1:
        raise ValueError(f"sync: the policy has active adapters {names}; activate exactly one.")
    return names[0]


def check_lora_config(cfg: Any, max_rank: int | None, name: str | None = None) -> None:
    """Refuse adapters vLLM would reject or that would be served differently, naming the PEFT setting to change.

    `max_rank` is the engine's largest servable rank ("lora" sync), or None when the adapter is merged; `name`, a
    population adapter's name, goes into the message.
    """
    from peft import LoraConfig

    label = f" {name!r}" if name else ""
    if not isinstance(cfg, LoraConfig):
        raise ValueError(
            f"sync: the policy's adapter{label} is a {type(cfg).__name__}; only LoRA adapters can be served."
        )
    problems = []
    rank = max([cfg.r, *(cfg.rank_pattern or {}).values()])
    if max_rank is not None and rank > max_rank:
        problems.append(f"rank {rank} > the engine's max_lora_rank {max_rank} (raise max_lora_rank)")
    if cfg.use_dora:
        problems.append("use_dora=True (vLLM serves plain LoRA only)")
    if cfg.bias != "none" or getattr(cfg, "lora_bias", False):
        problems.append(f"bias={cfg.bias!r} / lora_bias (use bias='none', lora_bias=False)")
    if cfg.modules_to_save:
        problems.append(
            f"modules_to_save={cfg.modules_to_save} (adapter-only sync cannot carry full modules)"
        )
    if problems:
        raise ValueError(f"sync: vLLM cannot serve this LoRA adapter{label}: " + "; ".join(problems) + ".")
