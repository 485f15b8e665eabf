"""CUDA paths that CI (CPU only) cannot run: `pytest -m gpu` on a GPU machine (bench/gpu_check.sh runs it first).

What differs on a GPU and is checked here: the chunked log-softmax's hand-written backward under CUDA bf16 autocast
(bf16 weights, as Tina trains), prompt sharing with SDPA attention in bf16, the fused LoRA layer and RMSNorm against
PEFT's and the model's under CUDA bf16 autocast, and a whole `fit` through the real CLI
on CUDA with bf16-mixed precision that writes a PEFT adapter that PEFT loads back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_tina import grpo
from lightning_tina.fused_norm import install_fused_rms_norm
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on one)"),
]
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


def test_token_logprobs_backward_under_cuda_bf16_autocast_matches_autograd() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 256, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = torch.randn(5000, 256, device="cuda", generator=g, dtype=torch.bfloat16) / 16  # [V, H], frozen
    targets = torch.randint(0, 5000, (2, 300), device="cuda", generator=g)  # [N, C]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight).float()  # [N, C, V]: the plain autograd version
        ref = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
        lp, ent = grpo.token_logprobs(hidden, targets, weight, chunk_tokens=128)
    (grad,) = torch.autograd.grad(lp.sum(), hidden)
    assert ent is not None and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)  # the same bf16 matmul, then float32 maths
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - ref_grad.float()).abs().max() <= 0.02 * ref_grad.float().abs().max()


def test_shared_prompt_matches_full_sequences_in_bf16_on_cuda() -> None:
    torch.manual_seed(0)
    policy = wrap_lora(load_causal_lm(str(TINY), "bfloat16"), LoRASettings(r=8, alpha=32, dropout=0.0)).cuda()
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so that it changes every layer
            p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    # 3 prompts x 4 completions, group-major: [12, 20 prompt + 16 completion tokens]
    ids = torch.randint(3, 200, (3, 36), generator=g).repeat_interleave(4, 0)
    ids[:, 20:] = torch.randint(3, 200, (12, 16), generator=g)
    ids, mask = ids.cuda(), torch.ones_like(ids).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        shared, _ = completion_logprobs(policy, ids, mask, 16, 4, share_prompt=True)  # [12, 16]
        full, _ = completion_logprobs(policy, ids, mask, 16, 4, share_prompt=False)
    assert torch.isfinite(shared).all()
    assert (shared - full).abs().mean() < 0.02  # bf16 kernels over different shapes: rounding only


def test_fused_lora_and_norm_match_peft_and_the_model_under_cuda_bf16_autocast() -> None:
    """The policy's log-probs and LoRA gradients with `model.lora.fused` and `model.fused_norm` against PEFT's
    forward and the model's own RMSNorm, on CUDA."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        settings = LoRASettings(r=8, alpha=32, dropout=0.0, fused=fused)
        base = load_causal_lm(str(TINY), "bfloat16")
        if fused:
            install_fused_rms_norm(base)
        policy = wrap_lora(base, settings).cuda()
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        ids = torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(1)).cuda()  # [N, P+C]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp, _ = completion_logprobs(
                policy, ids, torch.ones_like(ids), 32, 4, share_prompt=False
            )  # [N, C]
        lp.float().sum().backward()
        grads = torch.cat([p.grad.flatten().float() for p in policy.parameters() if p.grad is not None])
        results.append((lp.detach().float(), grads))
    (lp1, g1), (lp0, g0) = results
    # bf16 rounding only (one rounding of the low-rank sum instead of two); on CPU: 0.025 against |log-prob| 15
    assert (lp1 - lp0).abs().mean() <= 0.005 * lp0.abs().mean() + 0.01
    assert (g1 - g0).norm() <= 0.05 * g0.norm()  # on CPU: 0.007


def test_fit_on_cuda_bf16_mixed_writes_an_adapter_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    from lightning_tina.__main__ import cli_main

    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["trainer"].update(
        accelerator="gpu", precision="bf16-mixed", max_steps=2, default_root_dir=str(tmp_path)
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    bench, adapters, resume = cfg["trainer"]["callbacks"]
    bench["init_args"].update(limit=4, k=2, every_n_steps=0)
    adapters["init_args"].update(dirpath=str(tmp_path / "adapters"), every_n_steps=2, monitor=None)
    resume["init_args"].update(every_n_train_steps=2)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["model"]["grpo"].update(batch_size=16)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    assert next(cli.model.policy.parameters()).is_cuda
    saved = sorted((tmp_path / "adapters").glob("step-*"))
    assert saved, "no adapter was written"
    base = load_causal_lm(str(TINY))
    loaded = PeftModel.from_pretrained(base, str(saved[-1]))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())
