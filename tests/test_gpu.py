"""CUDA paths that CI (CPU only) cannot run: `pytest -m gpu` on a GPU machine (bench/gpu_check.sh runs it first).

What differs on a GPU and is checked here: the chunked log-softmax's hand-written backward under CUDA bf16 autocast
(bf16 weights, as Tina trains), prompt sharing with SDPA attention in bf16, the fused LoRA layer and RMSNorm against
PEFT's and the model's under CUDA bf16 autocast, and a whole `fit` through the real CLI
on CUDA with bf16-mixed precision that writes a PEFT adapter that PEFT loads back.

Issue 17 (bench/gpu_check.sh runs these and records what was skipped and why): the memory planner's training
estimate against the measured peak of a random-weight model of DeepSeek-R1-Distill-Qwen-1.5B's shape at Tina's
lengths; a 3-step fit with the colocated vLLM engine when vLLM's CUDA build is installed (freshness, sleep and wake,
memory before each wake); and with two GPUs, one engine per GPU (each training process on exactly one GPU, from
nvidia-smi).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    bench["init_args"].update(limit=4, k=2, every_n_train_steps=0)
    adapters["init_args"].update(dirpath=str(tmp_path / "adapters"), every_n_train_steps=2, monitor=None)
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


# ---- issue 17 ---------------------------------------------------------------------------------------------------


def _vllm_cuda() -> str | None:
    """None when vLLM's CUDA build is importable, else why not."""
    from lightning_tina.rollout.vllm import vllm_available

    if not vllm_available():
        return "vLLM is not installed (pip install -e .[gpu])"
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return f"the installed vLLM is not the CUDA build ({type(current_platform).__name__})"
    return None


def test_plan_estimate_against_measured_peak_at_tinas_shape_and_lengths() -> None:
    """A random-weight model of DeepSeek-R1-Distill-Qwen-1.5B's shape (no hub), bf16, LoRA r=32 on all seven
    projections, gradient checkpointing, one micro-batch of 4 x (512 + 3,584) tokens forward + backward + AdamW
    step: the measured CUDA peak must not exceed the planner's trainer estimate by more than 10%."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightning_tina import plan as planner

    shape = planner.KNOWN_SHAPES["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]
    config = Qwen2Config(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4608,
        attn_implementation="sdpa",
    )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        base = Qwen2ForCausalLM(config).to(torch.bfloat16)
    assert sum(p.numel() for p in base.parameters()) == shape.parameters()
    install_fused_rms_norm(base)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    policy = wrap_lora(base, LoRASettings(r=32, alpha=128, dropout=0.05))
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    mb, prompt, new = 4, 512, 3584
    ids = torch.randint(0, shape.vocab, (mb, prompt + new), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp, _ = completion_logprobs(policy, ids, torch.ones_like(ids), new, 4, share_prompt=False)
    lp.float().mean().backward()
    opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() / planner.GB
    cfg = {
        "model": {
            "model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            "dtype": "bfloat16",
            "lora": {"enabled": True, "r": 32, "target_modules": list(LoRASettings().target_modules)},
            "grpo": {
                "micro_batch_size": mb,
                "batch_size": 16,
                "num_generations": 4,
                "gradient_checkpointing": True,
            },
        },
        "data": {"max_prompt_length": prompt},
        "rollout": {"engine": "hf", "sampling": {"max_new_tokens": new}},
        "trainer": {"devices": 1},
    }
    plan = planner.plan_for(cfg, torch.cuda.get_device_properties(0).total_memory / planner.GB, "measured")
    p = plan.parts
    estimate = p["base weights"] + p["adapter + grads + AdamW"] + p["activations, checkpointing on"]
    estimate += p["log-prob chunk"]
    record = {
        "measured_peak_gb": round(measured, 3),
        "estimate_gb": round(estimate, 3),
        **{k: round(v, 3) for k, v in p.items()},
    }
    print("JSON plan_vs_measured " + json.dumps(record))
    assert measured <= 1.1 * estimate, record
    assert measured >= 0.3 * estimate, record  # the estimate is not absurdly high either


def test_fit_with_the_vllm_engine_three_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The colocated vLLM engine on CUDA: 3 optimizer steps of the tiny model with bf16-mixed, the engine serving
    the adapter (LoRA sync) with sleep mode on; its log-probs stay within rollout.vllm.max_logprob_diff of the
    trainer's, it slept and woke every step, and the memory before each wake-up is printed."""
    import json

    why = _vllm_cuda()
    if why:
        pytest.skip(why)
    from lightning_tina.__main__ import cli_main
    from lightning_tina.rollout.vllm import VLLMEngine, check_logprob_drift

    seen: list[dict] = []
    original_close = VLLMEngine.close

    def close(self: VLLMEngine) -> None:
        seen.append({"wake_memory": list(self.wake_memory), "kwargs": self.engine_kwargs()})
        original_close(self)

    monkeypatch.setattr(VLLMEngine, "close", close)
    path = _vllm_fit_config(tmp_path, devices=1)
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 3
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("engine/")}
    (engine,) = seen
    print("JSON vllm_fit " + json.dumps({"metrics": metrics, "wake_memory": engine["wake_memory"]}))
    check_logprob_drift(metrics["engine/logprob_diff_mean"], 0.1)
    assert engine["kwargs"]["distributed_executor_backend"] == "external_launcher"
    assert engine["kwargs"]["enable_sleep_mode"] is True
    assert len(engine["wake_memory"]) == 2  # woken before the 2nd and 3rd rollouts (the 1st starts awake)


_TWO_GPU_FIT = """
import sys, yaml
from lightning_tina.__main__ import cli_main
cli_main(["fit", "--config", sys.argv[1]])
"""


def _nvidia_smi(query: str, fmt: str = "csv,noheader") -> list[list[str]]:
    """nvidia-smi's answer to one --query-... flag: a row of stripped fields per line."""
    import subprocess

    out = subprocess.run(["nvidia-smi", query, f"--format={fmt}"], capture_output=True, text=True).stdout
    return [[x.strip() for x in line.split(",")] for line in out.strip().splitlines()]


def test_two_ranks_put_one_engine_on_each_gpu(tmp_path: Path) -> None:
    """DDP on two GPUs, a vLLM engine per rank: while it trains, nvidia-smi must show each training process on
    exactly one GPU, and the two on different GPUs (before issue 17 both engines started on GPU 0)."""
    import subprocess
    import sys
    import time

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    why = _vllm_cuda()
    if why:
        pytest.skip(why)
    path = _vllm_fit_config(tmp_path, devices=2, strategy="ddp")
    script = tmp_path / "fit.py"
    script.write_text(_TWO_GPU_FIT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=ROOT)
    index = {u: int(i) for i, u in _nvidia_smi("--query-gpu=index,uuid")}
    seen: dict[int, set[int]] = {}
    # the most memory each GPU had in use (MiB), for containers that hide the pids
    used: dict[int, float] = {}
    while proc.poll() is None:
        for i, m in _nvidia_smi("--query-gpu=index,memory.used", "csv,noheader,nounits"):
            used[int(i)] = max(used.get(int(i), 0.0), float(m))
        for pid, uuid, _ in _nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory"):
            seen.setdefault(int(pid), set()).add(index.get(uuid, -1))
        time.sleep(1)
    assert proc.returncode == 0
    print(
        "nvidia-smi, GPUs per process:",
        {pid: sorted(g) for pid, g in seen.items()},
        "peak MiB per GPU:",
        used,
    )
    busy = {pid: gpus for pid, gpus in seen.items() if gpus}
    if not busy:  # a PID namespace hides the processes: both GPUs must at least hold an engine's share
        assert sum(m > 4000 for m in used.values()) >= 2, used
        return
    assert len(busy) >= 2, busy
    assert all(len(g) == 1 for g in busy.values()), busy  # no process on two GPUs
    assert len(set().union(*busy.values())) >= 2, busy  # and the two ranks on different GPUs


def test_population_of_eight_with_the_vllm_engine(tmp_path: Path) -> None:
    """A population of eight adapters (two ranks, four learning rates) on CUDA: one vLLM call per step serves all
    eight as LoRAs side by side (weight_sync lora, max_loras 8), each adapter trains, and every adapter's engine
    log-probs stay within rollout.vllm.max_logprob_diff of the trainer's."""
    import json

    why = _vllm_cuda()
    if why:
        pytest.skip(why)
    from lightning_tina.__main__ import cli_main
    from lightning_tina.rollout.vllm import check_logprob_drift

    members = [
        {"name": f"r{r}_lr{i}", "lora": {"r": r, "alpha": 2 * r}, "optim": {"lr": 1e-3 * 2**i}}
        for r in (8, 16)
        for i in range(4)
    ]
    path = _vllm_fit_config(tmp_path, devices=1, population=members)
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 3
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("engine/")}
    print("JSON vllm_population " + json.dumps(metrics))
    for m in members:
        check_logprob_drift(metrics[f"engine/logprob_diff_mean/{m['name']}"], 0.1)
    assert cli.model.policy_version == 3 * len(members)


def _vllm_fit_config(
    tmp_path: Path, devices: int, population: list[dict] | None = None, **trainer: Any
) -> Path:
    """configs/tiny.yaml as a 3-step bf16 fit on `devices` GPUs with the vLLM engine (no callbacks), written out;
    with `population`, as a population of those members."""
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    if population is not None:
        cfg["model"]["population"] = population
    cfg["trainer"].update(accelerator="gpu", devices=devices, precision="bf16-mixed", max_steps=3, **trainer)
    cfg["trainer"].update(default_root_dir=str(tmp_path), callbacks=[])
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["model"]["grpo"].update(batch_size=16, micro_batch_size=16)
    cfg["rollout"]["engine"] = "vllm"
    cfg["rollout"]["vllm"] = {"gpu_memory_utilization": 0.3, "max_model_len": 512}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
