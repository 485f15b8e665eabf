"""The policy: a Hugging Face causal LM wrapped in a PEFT LoRA adapter, and its reference model.

With LoRA the reference is the same base weights with the adapter disabled (no second copy in memory); without
LoRA it is a frozen deep copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_tina.attention import CPU_ATTENTION
from lightning_tina.checks import check_fields
from lightning_tina.fused_lora import install_fused_lora

TINA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRASettings:
    """The LoRA adapter. Defaults are Tina's: rank 32, alpha 128, dropout 0.05 on all seven projections."""

    enabled: bool = True
    """Train a LoRA adapter; False trains all weights (the reference is then a frozen copy)."""
    r: int = 32
    """Rank of the adapter matrices."""
    alpha: int = 128
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(TINA_TARGET_MODULES))
    """Names (last path component) of the linear layers that get an adapter."""
    fused: bool = True
    """Run each adapted linear layer as one autograd function (lightning_tina/fused_lora.py): the same result as
    PEFT's forward with fewer element-wise passes (casts, scale, add) under bf16 autocast. False: PEFT's forward."""

    def __post_init__(self) -> None:
        check_fields(
            "model.lora",
            self,
            [
                ("r", self.r >= 1, ">= 1"),
                ("alpha", self.alpha > 0, "> 0"),
                ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("target_modules", bool(self.target_modules), "a non-empty list of linear layer names"),
            ],
        )


_ATTENTION_PACKAGES = {
    # model.attn_implementation -> (the package it needs, the transformers check that it is usable)
    "flash_attention_2": ("flash-attn", "is_flash_attn_2_available"),
    "flash_attention_3": ("flash-attn 3 (flash_attn_interface)", "is_flash_attn_3_available"),
    "flex_attention": ("torch>=2.5 with flex attention", "is_torch_flex_attn_available"),
}


def check_attention(attn_implementation: str | None) -> None:
    """Refuse an attention kernel that is not installed here, naming `model.attn_implementation` and the fix.

    "sdpa" (PyTorch's own kernels, flash attention included on CUDA) and "eager" always work; so does None (the
    library's choice) and lightning_tina's CPU kernel. Kernels from the hub ("kernels-community/...") need the
    `kernels` package."""
    if not attn_implementation or attn_implementation in ("sdpa", "eager", CPU_ATTENTION):
        return
    import transformers.utils as tu

    if attn_implementation in _ATTENTION_PACKAGES:
        package, check = _ATTENTION_PACKAGES[attn_implementation]
        fn = getattr(tu, check, None)
        if fn is None or fn():
            return  # a transformers without the check: let from_pretrained decide
        where = "a CUDA GPU and " if not torch.cuda.is_available() else ""
        raise ImportError(
            f"model.attn_implementation={attn_implementation!r} needs {where}{package}, which is not installed "
            f"here. Set model.attn_implementation: sdpa (PyTorch's kernels, nothing to install; the default of "
            f"configs/tina/base.yaml), or install it (`pip install flash-attn --no-build-isolation` for "
            f"flash_attention_2, see docs/gpu.md)."
        )
    if "/" in attn_implementation and not tu.is_kernels_available():
        raise ImportError(
            f"model.attn_implementation={attn_implementation!r} is a kernel from the hub and needs the `kernels` "
            "package (`pip install kernels`); or set model.attn_implementation: sdpa."
        )


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None
) -> nn.Module:
    """Load a causal LM from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    check_attention(attn_implementation)
    kwargs = {"dtype": _DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def linear_layer_names(model: nn.Module) -> set[str]:
    """The last path components of every nn.Linear in `model` (what LoRA target_modules can name)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def lora_config(lora: LoRASettings, model: nn.Module) -> Any:
    """PEFT's LoraConfig for `lora`, after checking that `model` has the layers it targets."""
    from peft import LoraConfig

    available = linear_layer_names(model)
    missing = [t for t in lora.target_modules if t not in available]
    if missing:
        raise ValueError(
            f"model.lora.target_modules names {missing}, which this model does not have; "
            f"its linear layers are {sorted(available)}"
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def wrap_lora(model: nn.Module, lora: LoRASettings, adapter_name: str = "default") -> nn.Module:
    """Wrap `model` in a PEFT LoRA adapter named `adapter_name`; only adapter weights stay trainable."""
    from peft import get_peft_model

    policy = get_peft_model(model, lora_config(lora, model), adapter_name=adapter_name)
    if lora.fused:
        install_fused_lora(policy)
    return policy


def causal_lm(policy: nn.Module) -> nn.Module:
    """The Hugging Face *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def backbone_and_head(policy: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The transformer that yields final hidden states, and the output projection to the vocabulary.

    Log-probs are computed from hidden states in chunks (see grpo.token_logprobs), so the model's own forward,
    which would build [N, T, V] logits, is not used in training.
    """
    lm = causal_lm(policy)
    head = lm.get_output_embeddings()
    backbone = getattr(lm, lm.base_model_prefix, None)
    if backbone is None or head is None:
        raise ValueError(
            f"{type(lm).__name__} exposes no decoder backbone / output head; it is not a causal LM"
        )
    return backbone, head


@contextlib.contextmanager
def reference_mode(policy: nn.Module, frozen_copy: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the reference model: the policy with its adapter disabled, or the frozen copy without LoRA."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    # PEFT re-enables adapters through set_adapter, which freezes every adapter but the active one: a
    # population's other adapters must stay trainable (their optimizers and checkpoints hold them)
    flags = [(p, p.requires_grad) for p in policy.parameters()]
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        for p, trainable in flags:
            p.requires_grad_(trainable)


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen deep copy of the model (full fine-tuning only)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def shard_fsdp2(policy: nn.Module, mesh, reference: nn.Module | None = None) -> None:
    """Shard the policy (and a frozen reference copy) with FSDP2 over the mesh's data-parallel dimension.

    Called from `configure_model` under Lightning's ModelParallelStrategy. Every decoder layer is one unit (its
    parameters are gathered for its forward/backward only); the causal LM is the root unit, which holds the
    embedding and the head (tied in small Qwen models, so they must stay in one unit). Log-probs call the model
    through that root (lightning_tina/logprobs.py), which gathers the root's parameters.
    """
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "ModelParallelStrategy with tensor_parallel_size > 1 is not supported for training here; set "
            "trainer.strategy.init_args.tensor_parallel_size 1 (rollout.vllm.tensor_parallel_size shards vLLM)"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    for model in (causal_lm(policy), reference):
        if model is None:
            continue
        backbone, _ = backbone_and_head(model)
        layers = getattr(backbone, "layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__} has no decoder `layers` to shard with FSDP2")
        for layer in layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 shards `model` (some of its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard, or `t` itself. A collective for a DTensor: every rank must call it
    for the same tensors in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(policy: nn.Module) -> dict[str, torch.Tensor] | None:
    """Whole copies of the trainable (adapter) weights when FSDP2 shards them, else None.

    A collective under FSDP2: every rank must call it, in the same order. The result is what
    `save_pretrained(state_dict=...)` needs, since PEFT cannot save DTensor shards.
    """
    if not is_sharded(policy):
        return None
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {name: whole(t).detach().cpu() for name, t in policy.state_dict().items() if name in trainable}
