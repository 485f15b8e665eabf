"""Code that runs inside vLLM 0.32's worker: in-memory adapter loading, faster CPU LoRA ops (one matmul per adapter),
and the compiled CPU RMSNorm.

All three reach into vLLM internals (the worker's LoRA manager, the CPU punica ops, vLLM's IR op registry), so they
are small, checked by the freshness test (tests/test_vllm_engine.py) against the PEFT policy, and fall back to vLLM's
own code otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def add_lora_from_tensors(worker: Any, lora_id: int, tensors: dict[str, Tensor], cfg: dict) -> None:
    """Register an adapter built from in-memory tensors under `lora_id` (called through `LLM.collective_rpc`).

    Mirrors what vLLM does for a path (PEFTHelper validation, then LoRAModel.from_lora_tensors) and adds the
    module-name check that vLLM performs only for files, so a target module vLLM has no LoRA layer for is an
    error instead of being silently dropped.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    manager, adapters = _lora_managers(worker)
    helper = PEFTHelper.from_dict({**cfg, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    expected: set[str] = set()
    for module in adapters.supported_lora_modules:
        expected.update(adapters.packed_modules_mapping.get(module, [module]))
    modules = {parse_fine_tuned_lora_name(k)[0] for k in tensors}
    unknown = sorted(m for m in modules if m.rsplit(".", 1)[-1] not in expected)
    if unknown:
        raise ValueError(f"sync: vLLM has no LoRA layer for {unknown[:4]}; target only {sorted(expected)}.")
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
    )
    adapters.add_adapter(lora)


def _lora_managers(worker: Any) -> tuple[Any, Any]:
    """The worker's LoRA manager and the adapter manager inside it (private fields of vLLM 0.32's V1 and V2 model
    runners), or a clear error when this vLLM lays them out differently."""
    runner = getattr(worker, "model_runner", None)
    manager = getattr(runner, "lora_manager", None)
    adapters = getattr(manager, "_adapter_manager", None)
    needed = ("supported_lora_modules", "packed_modules_mapping", "add_adapter")
    missing = [n for n in ("lora_config", "max_position_embeddings", "vocab_size") if not hasattr(manager, n)]
    missing += [n for n in needed if not hasattr(adapters, n)]
    if manager is None or adapters is None or missing:
        raise RuntimeError(
            f"sync: rollout.vllm.sync_mode 'tensors' hands the adapter to vLLM's worker through internals that this "
            f"vLLM ({type(runner).__name__}) does not have ({', '.join(missing) or 'lora_manager'}); set "
            "rollout.vllm.sync_mode: files (the adapter is saved and loaded by path, vLLM's public API)."
        )
    return manager, adapters


_FAST_PATH = {"on": False}  # read on every call, so an engine started with the fast path off runs vLLM's code
# vLLM's own punica_cpu functions, saved when the fast path goes in (the fallback of every fast op)
_ORIGINAL: dict[str, Callable[..., None]] = {}


def install_cpu_single_lora_fast_path(enabled: bool = True) -> bool:
    """Speed up vLLM's CPU LoRA ops: one matmul per adapter instead of a per-token gather.

    vLLM's CPU ops gather one copy of the adapter matrix per token ([T, r, in] / [T, out, r]) and multiply with a
    batched einsum; with a single adapter that is a plain matmul, y = x @ W^T. A batch that mixes a population's
    adapters runs one matmul per adapter over that adapter's tokens (rows). Batches with tokens without an adapter
    (index -1) or of unexpected shapes go to vLLM's original functions, and so does every batch after a call with
    `enabled=False`. Returns whether the fast path is on (False also when vLLM's module does not look as
    expected; then nothing is patched). The name is kept from when it handled single-adapter batches only.
    """
    from vllm.lora.punica_wrapper import punica_cpu

    _FAST_PATH["on"] = False
    if getattr(punica_cpu, "_tina_fast_path", False):
        _FAST_PATH["on"] = enabled
        return enabled
    if not enabled or not all(callable(getattr(punica_cpu, n, None)) for n in _FAST_OPS):
        return False
    _ORIGINAL.update({n: getattr(punica_cpu, n) for n in _FAST_OPS})
    for name, fn in _FAST_OPS.items():
        setattr(punica_cpu, name, fn)
    punica_cpu._tina_fast_path = True
    _FAST_PATH["on"] = True
    return True


_Groups = list[tuple[Tensor | None, Tensor]]
"""(token rows, adapter matrix [out, in]) per adapter of a batch; rows None: every token."""


def _groups(indices: Tensor, weights: Tensor, x: Tensor, out: Tensor) -> _Groups | None:
    """The adapter matrices of a batch with the tokens that use each: [(None, W)] when all tokens use the same
    adapter slot, one (rows, W) per slot when a population's adapters are mixed (one index per row of x and out);
    None (run vLLM's op) when the fast path is off or a token has no adapter."""
    if not _FAST_PATH["on"] or indices.numel() == 0 or int(indices[0]) < 0:
        return None
    if bool((indices == indices[0]).all()):
        return [(None, _slot(weights, int(indices[0])))]
    if int(indices.min()) < 0 or not indices.numel() == x.shape[0] == out.shape[0]:
        return None
    return [
        ((indices == u).nonzero(as_tuple=True)[0], _slot(weights, u)) for u in torch.unique(indices).tolist()
    ]


def _slot(weights: Tensor, index: int) -> Tensor:
    """The matrix [out, in] of adapter slot `index` ([slots, 1, out, in] or [slots, out, in] stacks)."""
    w = weights[index]  # [1, out, in] or [out, in]
    return w.squeeze(0) if w.dim() == 3 else w


def _products(groups: _Groups, x: Tensor, dtype: torch.dtype) -> Iterator[tuple[Tensor | None, Tensor]]:
    """(rows, x[rows] @ W^T in `dtype`) for each adapter of `_groups` (rows None: every row of x)."""
    for rows, w in groups:
        xs = x if rows is None else x[rows]
        yield rows, xs.to(dtype) @ w.to(dtype).T  # [T', out]


def _write(out: Tensor, rows: Tensor | None, cols: slice, y: Tensor, add: bool) -> None:
    """out[rows, cols] = y, or += y when `add` (rows None: every row)."""
    where = (slice(None) if rows is None else rows, cols)
    if add:
        out[where] += y
    else:
        out[where] = y


def _bgmv_shrink(x: Tensor, w_all: Tensor, out: Tensor, idx: Tensor, scaling: float = 1.0) -> None:
    """vLLM's `bgmv_shrink` (x @ A^T into out, scaled) as one matmul per adapter."""
    groups = _groups(idx, w_all, x, out)
    if groups is None:
        return _ORIGINAL["bgmv_shrink"](x, w_all, out, idx, scaling)
    for rows, y in _products(groups, x, out.dtype):  # y: [T', r]
        _write(out, rows, slice(0, y.shape[1]), scaling * y, add=False)


def _bgmv_expand(x: Tensor, w_all: Tensor, out: Tensor, idx: Tensor, add_inputs: bool = True) -> None:
    """vLLM's `bgmv_expand` (x @ B^T into or onto out) as one matmul per adapter."""
    groups = _groups(idx, w_all, x, out)
    if groups is None:
        return _ORIGINAL["bgmv_expand"](x, w_all, out, idx, add_inputs)
    for rows, y in _products(groups, x, out.dtype):  # y: [T', out]
        # as vLLM's bgmv_expand: one input row onto every output row (single adapter only: mixed has one per row)
        limit = 1 if rows is None and y.shape[0] == 1 and out.shape[0] != 1 else out.shape[0]
        width = min(y.shape[1], out.shape[1])
        _write(out, rows, slice(0, width), y[:limit, :width], add_inputs)


def _bgmv_expand_slice(
    x: Tensor, w_all: Tensor, out: Tensor, idx: Tensor, offset: int, size: int, add_inputs: bool = True
) -> None:
    """vLLM's `bgmv_expand_slice` (x @ B^T into or onto columns offset:offset+size) as one matmul per adapter."""
    groups = _groups(idx, w_all, x, out)
    if groups is None:
        return _ORIGINAL["bgmv_expand_slice"](x, w_all, out, idx, offset, size, add_inputs)
    for rows, y in _products(groups, x, out.dtype):  # y: [T', size]
        _write(out, rows, slice(offset, offset + size), y, add_inputs)


def _prefill(decode: Callable[..., None], add_at: int | None) -> Callable[..., None]:
    """A prefill (sgmv) op made from a decode (bgmv) op, as vLLM makes its own: sgmv gives one adapter index per
    sequence, repeated here for each of its tokens. The arguments after vLLM's prefill metadata (scaling; add;
    offset, size, add) pass on; an expand op's `add`, at position `add_at` among them, is False when left out, as
    in vLLM's sgmv ops (their bgmv ops default to True)."""

    def sgmv(
        x: Tensor,
        w_all: Tensor,
        out: Tensor,
        starts: Tensor,
        lens: Tensor,
        idx: Tensor,
        batches: int,
        max_len: int,
        tokens: int,
        *args: Any,
    ) -> None:
        """vLLM's sgmv signature: the prefill metadata (starts ... tokens), then `args`."""
        if add_at is not None and len(args) == add_at:
            args = (*args, False)
        decode(x, w_all, out, torch.repeat_interleave(idx, lens), *args)

    return sgmv


_FAST_OPS: dict[str, Callable[..., None]] = {
    "bgmv_shrink": _bgmv_shrink,
    "bgmv_expand": _bgmv_expand,
    "bgmv_expand_slice": _bgmv_expand_slice,
    "sgmv_shrink": _prefill(_bgmv_shrink, add_at=None),
    "sgmv_expand": _prefill(_bgmv_expand, add_at=0),
    "sgmv_expand_slice": _prefill(_bgmv_expand_slice, add_at=2),
}
"""The punica_cpu functions that the fast path replaces, by name."""


CPU_NORM_PROVIDER = "lightning_tina_cpu"
"""The name under which `install_cpu_rms_norm` registers its RMSNorm implementations with vLLM's IR ops."""


def install_cpu_rms_norm() -> dict[str, list[str]] | None:
    """Route vLLM's RMSNorm to the compiled kernels that its CPU build ships but does not use.

    vLLM 0.32 dispatches `rms_norm` and `fused_add_rms_norm` (two per decoder layer) through its IR op registry,
    and on CPU its only registered implementation is the native torch one (six to eight element-wise ops; the
    compiled `vllm_c` provider is marked GPU-only although `torch.ops._C.rms_norm` exists in the CPU build). This
    registers the compiled kernels under `CPU_NORM_PROVIDER` for inputs they handle (contiguous, a weight of the
    input's dtype, no variance-size override; anything else falls back to native) and returns the
    `kernel_config.ir_op_priority` that puts them first, or None when this vLLM lacks the pieces. They compute in
    float32 and round once (native rounds the normalized value to bf16 before the weight multiply), so they agree with
    native to float32 rounding in float32 and are closer to the float64 result in bfloat16. Measured on the 2-core CI
    CPU, 18M Qwen2 in bf16, 32 x 64 tokens: 4x faster per call, generation 4-7% faster
    (bench/README_rollout.md).
    """
    ops = _cpu_norm_ops()
    if ops is None:
        return None
    if CPU_NORM_PROVIDER not in ops.rms_norm.impls:
        ops.rms_norm.register_impl(CPU_NORM_PROVIDER, supports_args=_compiled_takes)(_compiled_rms_norm)
        ops.fused_add_rms_norm.register_impl(
            CPU_NORM_PROVIDER, supports_args=_compiled_takes_add, inplace=True
        )(_compiled_fused_add_rms_norm)
    order = [CPU_NORM_PROVIDER, "native"]
    return {"rms_norm": order, "fused_add_rms_norm": list(order)}


def _cpu_norm_ops() -> Any:
    """vLLM's IR ops (`vllm.ir.ops`) on a CPU platform whose build has the compiled norms, with those kernels
    loaded; None elsewhere (no vLLM, a GPU platform, or a vLLM without these ops)."""
    try:
        from vllm import ir
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    current_platform.import_kernels()  # loads vLLM's compiled ops (torch.ops._C), as vLLM does at start
    ops = getattr(ir, "ops", None)
    if (
        not hasattr(ops, "rms_norm")
        or not hasattr(ops, "fused_add_rms_norm")
        or not hasattr(torch.ops._C, "rms_norm")
        or not hasattr(torch.ops._C, "fused_add_rms_norm")
    ):
        return None
    return ops


def _compiled_takes(
    x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
) -> bool:
    """Whether the compiled `rms_norm` handles these arguments (else vLLM runs its native one)."""
    return variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()


def _compiled_takes_add(
    x: Tensor,
    x_residual: Tensor,
    weight: Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> bool:
    """Whether the compiled `fused_add_rms_norm` handles these arguments (else vLLM runs its native one)."""
    return _compiled_takes(x, weight, epsilon, variance_size) and x_residual.is_contiguous()


def _compiled_rms_norm(
    x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
) -> Tensor:
    """RMSNorm by vLLM's compiled CPU kernel (the signature is vLLM's `rms_norm` op's, which it checks)."""
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def _compiled_fused_add_rms_norm(
    x: Tensor,
    x_residual: Tensor,
    weight: Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add + RMSNorm by vLLM's compiled CPU kernel, in place: x_residual <- x + x_residual, x <- the
    normalized sum."""
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual
