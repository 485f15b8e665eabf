"""The switchboard: every place lightning_tina changes third-party code or process-wide state, in one list.

For each: what is patched, where, the setting that turns it off, the library version it was written against, what
runs where it does not apply (the fallback), and the test that fails when an upgrade breaks it. The patches that
lightning_tina's own code paths apply go through the functions below, so a reader finds every one from here.
Subclasses or hooks replace a patch where they are as fast (the progress bar is a subclass, the attention and the
vLLM norm are registry entries); the rest replace a forward on instances because transformers and PEFT build those
modules themselves, and a subclass would mean rebuilding the model.

1. PEFT LoRA forward: `peft.tuners.lora.layer.Linear.forward`, replaced per instance on the policy's LoRA layers.
   Where: lightning_tina/fused_lora.py `install_fused_lora`, called by policy.wrap_lora.
   Off: model.lora.fused=false. Written against: peft 0.21.
   Fallback: PEFT's own forward, per call, for any variant, dropout, dtype or sharding it does not cover.
   Breaks: tests/test_fused_lora.py.
2. HF RMSNorm forward: `forward` of the transformers RMSNorm classes in fused_norm.FUSED_NORM_CLASSES, replaced per
   instance on norms with frozen weights. Where: lightning_tina/fused_norm.py, through `fused_rms_norm` below.
   Off: model.fused_norm=false. Written against: transformers 5.19.
   Fallback: the model's own forward for trainable or sharded weights and for other norm classes.
   Breaks: tests/test_fused_norm.py.
3. transformers attention registry: a new entry in `AttentionInterface` and `ALL_MASK_ATTENTION_FUNCTIONS` (their
   extension point; nothing is replaced). Where: lightning_tina/attention.py, through `attention_implementation`.
   Off: set model.attn_implementation (e.g. sdpa); None without CUDA selects it. Written against: transformers 5.19.
   Fallback: transformers' SDPA above attention.PLAIN_MAX_SCORE_BYTES. Breaks: tests/test_attention.py.
4. vLLM punica functions: `vllm.lora.punica_wrapper.punica_cpu` module functions (on CPU, one matmul per adapter
   instead of a per-token gather: one adapter, or a population's adapters mixed in a batch). Where:
   lightning_tina/rollout/vllm_worker.py `install_cpu_single_lora_fast_path` (the vLLM engine's code).
   Off: see rollout.vllm (VLLMConfig). Written against: vLLM 0.32.
   Fallback: vLLM's own functions when their names change, or for tokens without an adapter.
   Breaks: tests/test_vllm_engine.py (freshness tests), tests/test_vllm_population.py.
5. vLLM IR op registry: a CPU provider of `rms_norm` and `fused_add_rms_norm`. Where: rollout/vllm_worker.py
   `install_cpu_rms_norm`. Off: see rollout.vllm (VLLMConfig). Written against: vLLM 0.32.
   Fallback: vLLM's native op. Breaks: tests/test_vllm_engine.py::test_compiled_cpu_rms_norm_matches_native.
6. `torch.distributed.destroy_process_group`, swapped for a no-op while vLLM shuts down in-process (it would destroy
   the trainer's process group), then restored. Where: lightning_tina/rollout/vllm.py. Off: always on with
   colocated vLLM. Written against: vLLM 0.32, torch 2.13. Fallback: none needed (restored in a finally).
   Breaks: tests/test_distributed.py (vLLM under DDP).
7. `torch.set_num_threads` (restored around vLLM's in-process start, which replaces it with a no-op) and the
   VLLM_ENABLE_V1_MULTIPROCESSING environment variable. Where: lightning_tina/rollout/vllm.py; tiny/build.py sets
   one thread while it builds the model. Off: always. Written against: vLLM 0.32.
   Fallback: the trainer's own value is put back. Breaks: tests/test_vllm_training.py.
8. `os.environ["TOKENIZERS_PARALLELISM"]`, set to false only when unset. Where: `process_defaults` below (the CLI).
   Off: set it yourself. Fallback: the user's value wins. Breaks: tests/test_cli.py.
9. Warning filters: Lightning 2.6's own pytree LeafSpec deprecation and "ModelCheckpoint with manual optimization".
   Where: `process_defaults` below (the CLI). Off: always on under the CLI. Written against: lightning 2.6.
   Fallback: the warnings print (harmless). Breaks: nothing fails; the output gets noisier.
10. TensorBoardLogger's `hp_metric` placeholder, switched off on the instance (lightning_tina logs no such metric).
    Where: `no_hp_metric` below (the CLI). Off: always under the CLI. Written against: lightning 2.6.
    Fallback: TensorBoard shows an unused `hp_metric` of -1. Breaks: tests/test_cli.py.
"""

from __future__ import annotations

import os
import warnings

import torch


def attention_implementation(requested: str | None) -> str | None:
    """The attention to load the model with: `requested`, or lightning_tina's CPU attention (registered with
    transformers here) when none is requested and there is no CUDA device."""
    from lightning_tina.attention import CPU_ATTENTION, register_cpu_attention

    attn = requested
    if attn is None and not torch.cuda.is_available():
        attn = CPU_ATTENTION  # faster than SDPA for short CPU sequences (lightning_tina/attention.py)
    if attn == CPU_ATTENTION:
        register_cpu_attention()
    return attn


def fused_rms_norm(model: torch.nn.Module) -> int:
    """Give the model's frozen RMSNorm layers the fused forward (lightning_tina/fused_norm.py)."""
    from lightning_tina.fused_norm import install_fused_rms_norm

    return install_fused_rms_norm(model)


def process_defaults() -> None:
    """What the CLI sets for the whole process: tokenizers' fork warning off, two known-harmless warnings hidden."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning 2.6 trips over its own torch.utils._pytree deprecation on every step: noise, not a problem.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # GRPO steps its optimizer inside training_step; the state after the step is exactly what resume needs.
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")


def no_hp_metric(loggers: list) -> None:
    """Stop TensorBoardLogger from writing its `hp_metric` placeholder (lightning_tina logs no such metric)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._default_hp_metric = False
