"""Objective parity, Tina's side: one GRPO step of Tina's own trainer on a fixed case. Runs in parity/.venv-tina.

Tina's `GRPOTrainer` (`tina/post_train_hf/grpo_trainer.py`, TRL 0.15.2 plus Tina's changes) is built as Tina's
`grpo.py` builds it (a PEFT model, reward functions with weights, Tina's GRPOConfig at Tina's settings) and its real
`training_step` (HF Trainer: `_prepare_inputs` -> `compute_loss` -> backward with gradient accumulation) runs once
per group. Only generation is replaced: the model's `generate` returns the case's fixed completion ids, so the
prompts, completions and rewards are the case's and everything downstream is Tina's code.

The case (written to WORK/objective_case.pt and read by parity/objective_ours.py): the tiny Qwen2 of data/tiny, a
LoRA adapter with random non-zero A and B (so the policy differs from the reference and every LoRA weight gets a
gradient), B prompts x G completions of varied lengths (one cut at the length limit, without EOS), two per-completion
reward columns (one None), weights 1 and 2. Output: WORK/objective_tina.pt (advantages, loss, LoRA gradients).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"]
PROBLEMS = ["What is 12 + 35? Show your steps.", "Compute 7 * 8 - 3."]
G = 4
MAX_COMPLETION = 24
REWARD_WEIGHTS = [1.0, 2.0]  # format 1, accuracy 2 (Tina's main recipes)


def make_case(tokenizer, seed: int = 0) -> dict:
    """Fixed completions (token ids) and per-completion rewards for each prompt."""
    gen = torch.Generator().manual_seed(seed)
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    lengths = [[5, 17, MAX_COMPLETION, 9], [12, 3, 20, 14]]  # group 0, member 2: cut at the limit (no EOS)
    completions, fmt, acc = [], [], []
    for b in range(len(PROBLEMS)):
        for g in range(G):
            n = lengths[b][g]
            picks = torch.randint(len(ordinary), (n,), generator=gen).tolist()
            ids = [ordinary[i] for i in picks]
            if n < MAX_COMPLETION:
                ids[-1] = tokenizer.eos_token_id
            completions.append(ids)
    fmt = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    acc = [[1.0, None, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]  # None: that function skips that completion (nansum)
    return {"problems": PROBLEMS, "completions": completions, "r_format": fmt, "r_accuracy": acc}


def random_adapter(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA A and B (PEFT's init has B = 0: the policy would equal the reference)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
            state[name] = p.detach().clone()
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tina-dir", required=True, help="a checkout of shangshang-wang/Tina")
    ap.add_argument("--model", required=True, help="tiny Qwen2 directory (data/tiny)")
    ap.add_argument("--work", required=True, help="directory for the case and the results")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.tina_dir).resolve()))
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from tina.post_train_hf.grpo_config import GRPOConfig
    from tina.post_train_hf.grpo_trainer import GRPOTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=0.0,  # dropout draws random masks: parity needs it off (Tina: 0.05)
        target_modules=TARGETS,
        inference_mode=False,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    model = get_peft_model(model, lora)
    adapter = random_adapter(model)
    case = make_case(tokenizer)

    def replay_format(prompts, completions, r_format, **kwargs):
        return list(r_format)

    def replay_accuracy(prompts, completions, r_accuracy, **kwargs):
        return list(r_accuracy)

    rows = []  # one dict per completion, as TRL's sampler hands them (the prompt repeated G times)
    for b, problem in enumerate(case["problems"]):
        for g in range(G):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": problem}],
                    "r_format": case["r_format"][b][g],
                    "r_accuracy": case["r_accuracy"][b][g],
                }
            )
    config = GRPOConfig(
        output_dir=str(work / "tina_trainer"),
        per_device_train_batch_size=G,  # Tina: per_device_train_batch_size = G, one group per micro-step
        num_generations=G,
        gradient_accumulation_steps=len(case["problems"]),
        beta=0.04,
        temperature=0.7,
        max_prompt_length=512,
        max_completion_length=MAX_COMPLETION,
        scale_rewards=True,
        reward_weights=REWARD_WEIGHTS,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        report_to=[],
        seed=42,
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[replay_format, replay_accuracy],
        args=config,
        train_dataset=Dataset.from_list(rows),
    )

    completions = iter(case["completions"])

    def fixed_generate(input_ids, attention_mask=None, generation_config=None, **kwargs):
        """The case's completions after the prompts, right-padded with the pad token (as generate pads)."""
        comps = [next(completions) for _ in range(input_ids.shape[0])]
        width = max(len(c) for c in comps)
        out = torch.full((input_ids.shape[0], width), tokenizer.pad_token_id, dtype=torch.long)
        for i, c in enumerate(comps):
            out[i, : len(c)] = torch.tensor(c)
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)

    trainer.model.generate = fixed_generate  # the only replaced piece of Tina's step
    captured = {"advantages": [], "loss": [], "prompt_ids": []}
    prepare, compute_loss = trainer._prepare_inputs, trainer.compute_loss

    def record_prepare(inputs):
        out = prepare(inputs)
        captured["advantages"].append(out["advantages"].detach().clone())
        for ids, m in zip(out["prompt_ids"], out["prompt_mask"], strict=True):
            captured["prompt_ids"].append(ids[m.bool()].tolist())
        return out

    def record_loss(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        captured["loss"].append(loss.detach().clone())
        return loss

    trainer._prepare_inputs, trainer.compute_loss = record_prepare, record_loss
    trainer.model.zero_grad(set_to_none=True)
    for b in range(len(case["problems"])):
        trainer.training_step(trainer.model, rows[b * G : (b + 1) * G])
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(g is not None for g in grads.values())
    prompt_ids = [captured["prompt_ids"][b * G] for b in range(len(case["problems"]))]
    torch.save(
        {
            "case": case,
            "prompt_ids": prompt_ids,
            "adapter": adapter,
            "lora": {"r": 8, "alpha": 32, "targets": TARGETS},
            "reward_weights": REWARD_WEIGHTS,
            "group_size": G,
            "max_completion": MAX_COMPLETION,
        },
        work / "objective_case.pt",
    )
    loss = torch.stack(captured["loss"]).mean()  # what the accumulated backward differentiates
    torch.save(
        {"advantages": torch.cat(captured["advantages"]), "loss": loss, "grads": grads},
        work / "objective_tina.pt",
    )
    print(
        f"tina: loss {loss.item():.6g}, {len(grads)} LoRA gradients, advantages {torch.cat(captured['advantages'])}"
    )


if __name__ == "__main__":
    main()
