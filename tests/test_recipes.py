"""Tina's recipes (configs/tina/): each matches the Tina repository's values, and each runs one optimizer step.

TINA below is transcribed by hand from shangshang-wang/Tina (commit c6274cd), recipes/DeepSeek-R1-Distill-Qwen-1.5B/
grpo/train_model_<name>.yaml, plus what its launch script adds (--cosine_max_len 3584 for the recipes named in
scripts/train/post_train_model_grpo.sh and for the long-completion script). `expected()` is the translation into
lightning_tina's settings that docs/recipes.md explains; the test compares it with `--print_config` of each recipe.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_tina.__main__ import cli_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "tina"
TINY = ROOT / "data" / "tiny"

COMMON: dict[str, Any] = {
    "model_name_or_path": "DeepSeek-R1-Distill-Qwen-1.5B",
    "attn_implementation": "flash_attention_2",
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"],
    "bf16": True,
    "use_vllm": True,
    "vllm_device": "cuda:0",
    "vllm_gpu_memory_utilization": 0.4,
    "vllm_max_model_len": 4608,
    "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True,
    "learning_rate": 1e-6,
    "lr_scheduler_type": "cosine_with_min_lr",
    "min_lr_rate": 0.1,
    "warmup_ratio": 0.1,
    "max_prompt_length": 512,
    "max_completion_length": 3584,
    "save_total_limit": 100,
    "seed": 42,
    "temperature": 0.7,
    "lora_r": 32,
    "lora_alpha": 128,
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "rewards": [("format", 1.0), ("accuracy", 2.0)],
    # tina/post_train_hf/grpo_config.py and tina/config.py defaults the recipes do not override
    "beta": 0.04,
    "scale_rewards": True,
    "cosine_max_len": 1000,
    "repetition_n_grams": 3,
    "repetition_max_penalty": -1.0,
    # scripts/train/post_train_model_grpo.sh: accelerate launch --num_processes 2 (CUDA_VISIBLE_DEVICES=0,1)
    "num_processes": 2,
}
SEVEN = [(n, 1.0) for n in ("accuracy", "format", "tag_count", "length", "reasoning_steps", "cosine")] + [
    ("repetition_penalty", 1.0)
]
RS = {
    "num_generations": 6,
    "per_device_train_batch_size": 6,
    "max_steps": 1500,
    "stop_at": 850,
    "save_steps": 50,
}
LIMR = {"dataset": "limr", "max_steps": 360, "stop_at": 180, "save_steps": 10}
TINA: dict[str, dict[str, Any]] = {
    "still": {"dataset": "still", "rewards": [("length", 1.0), ("accuracy", 2.0)], "max_steps": 7500, "stop_at": 3750, "save_steps": 10},
    "deepscaler": {"dataset": "deepscaler", "max_steps": 11000, "stop_at": 5500, "save_steps": 100},
    "2thought": {"dataset": "2thought", "max_steps": 13320, "stop_at": 6660, "save_steps": 100},
    "fastcurl": {"dataset": "fastcurl", "max_steps": 11000, "stop_at": 5500, "save_steps": 100},
    "l1_exact": {"dataset": "l1_exact", "rewards": [("length_l1_exact", 1.0)], "max_steps": 11000, "stop_at": 5500, "save_steps": 100},
    "l1_max": {"dataset": "l1_max", "rewards": [("length_l1_max", 1.0)], "max_steps": 11000, "stop_at": 5500, "save_steps": 100},
    "open_rs1": {"dataset": "open_rs1", "max_steps": 5000, "stop_at": 2400, "save_steps": 100},
    "open_rs2": {"dataset": "open_rs2", **RS},
    "open_rs3": {"dataset": "open_rs3", "rewards": [("format", 1.0), ("cosine", 2.0)], "cosine_max_len": 3584, **RS},
    "limr": LIMR,
    "open_r1": {
        "dataset": "open_r1", "rewards": SEVEN, "num_generations": 8, "per_device_train_batch_size": 8,
        "max_steps": None, "save_steps": 100, "vllm_max_model_len": None, "cosine_max_len": 3584,
    },
    "thoughts": {
        "dataset": "thoughts", "rewards": SEVEN, "num_generations": 8, "per_device_train_batch_size": 8,
        "max_steps": None, "save_steps": 100, "vllm_max_model_len": None, "vllm_gpu_memory_utilization": 0.6,
        "cosine_max_len": 3584,
    },
    "limr_large_lr_ablation": {**LIMR, "learning_rate": 5e-6},
    "limr_small_lr_ablation": {**LIMR, "learning_rate": 5e-7},
    "limr_large_rank_ablation": {**LIMR, "lora_r": 128, "lora_alpha": 512, "save_steps": 50},
    "limr_medium_rank_ablation": {**LIMR, "lora_r": 16, "lora_alpha": 64, "save_steps": 50},
    "limr_small_rank_ablation": {**LIMR, "lora_r": 8, "lora_alpha": 32, "save_steps": 50},
    "limr_tiny_rank_ablation": {**LIMR, "lora_r": 4, "lora_alpha": 16, "save_steps": 50},
    "open_rs3_drgrpo_ablation": {
        "dataset": "open_rs3", "rewards": [("format", 1.0), ("cosine", 2.0)], "cosine_max_len": 3584,
        "scale_reward": False, **RS,
    },
    "open_rs3_format_ablation": {
        "dataset": "open_rs3",
        "rewards": [(n, 1.0) for n in ("format", "tag_count", "length", "reasoning_steps", "repetition_penalty")],
        **RS,
    },
    "open_rs3_long_completion_ablation": {
        "dataset": "open_rs3", "rewards": [("format", 1.0), ("cosine", 2.0)], "cosine_max_len": 3584,
        "scale_reward": False, "max_completion_length": 8960, "vllm_device": "auto",
        "vllm_gpu_memory_utilization": 0.7, **RS,
    },
}  # fmt: skip
APPROX_ROWS = {"open_r1": 93_700, "thoughts": 66_100}
"""Rows of the datasets whose recipes set no max_steps (one epoch), from the sizes in Tina's tina/utils/constant.py."""
SOURCES = {"fastcurl": "Nickyang/FastCuRL"}
"""data.source where it differs from Tina's dataset name (Tina's map has the fastcurl entry commented out)."""


def expected(name: str) -> dict[str, Any]:
    """Tina's recipe `name` in lightning_tina's terms (docs/recipes.md explains each line), as dotted keys."""
    t = {**COMMON, **TINA[name]}
    g, per_device, world = t["num_generations"], t["per_device_train_batch_size"], t["num_processes"]
    schedule = t[
        "max_steps"
    ]  # Tina's max_steps is the lr schedule; its comment "but stop at M steps" the run
    stop = t.get("stop_at", schedule)
    if schedule is None:  # HF Trainer: one epoch = ceil(rows * G / per_device / processes) // accumulation
        stop = math.ceil(APPROX_ROWS[name] * g / per_device / world) // t["gradient_accumulation_steps"]
    drgrpo = t.get("scale_reward") is False  # the recipe's intent; TRL 0.15.2 drops the misspelt key
    max_len = t["vllm_max_model_len"]
    if max_len is not None:  # our engine refuses prompt + completion > max_model_len (Tina's vLLM cut them)
        max_len = max(max_len, t["max_prompt_length"] + t["max_completion_length"])
    kwargs = {
        "cosine": {"max_len": t["cosine_max_len"]},
        "repetition_penalty": {
            "ngram_size": t["repetition_n_grams"],
            "max_penalty": t["repetition_max_penalty"],
        },
    }
    return {
        "seed_everything": t["seed"],
        "trainer.devices": world,
        "trainer.strategy": "ddp",
        "trainer.precision": "bf16-mixed" if t["bf16"] else "32-true",
        "trainer.max_steps": stop,
        "checkpoint.every_n_train_steps": t["save_steps"],
        "trainer.callbacks.0.init_args.keep_last": t["save_total_limit"],
        "trainer.callbacks.2.init_args.cost_per_gpu_hour": 1.0,
        "model.model": "deepseek-ai/" + t["model_name_or_path"],
        "model.dtype": "bfloat16" if t["bf16"] else "float32",
        "model.attn_implementation": "sdpa",  # Tina: flash_attention_2; same attention, nothing to install
        "model.lora.r": t["lora_r"],
        "model.lora.alpha": t["lora_alpha"],
        "model.lora.dropout": t["lora_dropout"],
        "model.lora.target_modules": t["lora_target_modules"],
        "model.grpo.num_generations": g,
        "model.grpo.batch_size": per_device * t["gradient_accumulation_steps"],
        "model.grpo.micro_batch_size": per_device,
        "model.grpo.beta": t["beta"],
        "model.grpo.temperature": t["temperature"],
        "model.grpo.logprob_temperature": 1.0,  # TRL 0.15.2 _get_per_token_logps: raw logits (no / temperature)
        "model.grpo.scale_rewards": "none" if drgrpo or not t["scale_rewards"] else "group",
        "model.grpo.loss_type": "bnpo" if drgrpo or not t["scale_rewards"] else "grpo",
        "model.grpo.num_iterations": 1,
        "model.grpo.max_grad_norm": 1.0,
        "model.grpo.gradient_checkpointing": t["gradient_checkpointing"],
        "model.optim.lr": t["learning_rate"],
        "model.optim.warmup_ratio": t["warmup_ratio"],
        "model.optim.min_lr_ratio": t["min_lr_rate"],
        "model.optim.weight_decay": 0.0,
        "model.optim.schedule_steps": schedule,
        "model.rewards": [
            {"name": n, "weight": w, "kwargs": kwargs.get(n, {}), "scope": "group"} for n, w in t["rewards"]
        ],
        "data.source": SOURCES.get(t["dataset"], t["dataset"]),
        "data.chat_template": "tina_r1",
        "data.max_prompt_length": t["max_prompt_length"],
        "data.gold": "tina",  # grpo.py: the `solution` column when the dataset has one, else $answer$
        "data.drop_unparseable_gold": False,  # Tina kept such rows (accuracy reward None)
        "data.seed": t["seed"],
        "rollout.engine": "vllm" if t["use_vllm"] else "hf",
        "rollout.sampling.max_new_tokens": t["max_completion_length"],
        "rollout.sampling.top_p": 1.0,
        "rollout.sampling.top_k": 0,
        "rollout.vllm.gpu_memory_utilization": t["vllm_gpu_memory_utilization"],
        "rollout.vllm.max_model_len": max_len,
        "rollout.vllm.weight_sync": "merged",  # TRL 0.15.2 merged the adapter into the bf16 weights for vLLM
    }


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
    return cfg


def print_config(*args: str) -> dict[str, Any]:
    """The resolved config of `fit` with `args`, as printed by --print_config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


POPULATIONS = {
    # population recipe: (the solo recipes it gathers, member name -> solo recipe)
    "limr_rank_population": {
        "rank_4": "limr_tiny_rank_ablation",
        "rank_8": "limr_small_rank_ablation",
        "rank_16": "limr_medium_rank_ablation",
        "rank_32": "limr",
        "rank_128": "limr_large_rank_ablation",
    },
    "limr_lr_population": {
        "lr_5e-7": "limr_small_lr_ablation",
        "lr_1e-6": "limr",
        "lr_5e-6": "limr_large_lr_ablation",
    },
}
"""lightning_tina's own recipes beside Tina's: one population run per ablation (docs/population.md)."""


def test_every_tina_recipe_has_a_config_and_nothing_else():
    files = {p.stem for p in RECIPES.glob("*.yaml")} - {"base"}
    assert files == set(TINA) | set(POPULATIONS)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


@pytest.mark.parametrize("name", sorted(POPULATIONS))
def test_population_recipe_gathers_the_solo_ablations(name):
    """Each member has exactly its solo recipe's LoRA and optimizer settings; everything else is limr.yaml's except
    the logger name and the weight sync a population needs (the decisions commented in the recipe)."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert list(raw)[0] == "config" and raw["config"] == "limr.yaml"
    assert all("." in k for k in list(raw)[1:]), f"{name}.yaml: dotted keys only after `config:`"
    cfg = print_config("--config", str(RECIPES / f"{name}.yaml"))
    members = cfg["model"]["population"]
    assert [m["name"] for m in members] == list(POPULATIONS[name])
    for member in members:
        solo = expected(POPULATIONS[name][member["name"]])
        lora, optim = member["lora"], member["optim"]
        assert lora.get("r", cfg["model"]["lora"]["r"]) == solo["model.lora.r"], member
        assert lora.get("alpha", cfg["model"]["lora"]["alpha"]) == solo["model.lora.alpha"], member
        assert optim.get("lr", cfg["model"]["optim"]["lr"]) == solo["model.optim.lr"], member
        assert member["seed"] is None
    limr = _flat(print_config("--config", str(RECIPES / "limr.yaml")))
    ours = _flat(cfg)
    decided = {
        "trainer.logger.init_args.name": name,
        "rollout.vllm.weight_sync": "lora",  # merged weights hold one adapter
        "checkpoint.every_n_train_steps": 10,  # limr's save_steps; a multiple of it covers the rank ablations' 50
    }
    for key, value in decided.items():
        assert ours[key] == value, key
    differ = {k for k in set(limr) | set(ours) if limr.get(k) != ours.get(k)}
    assert differ - {"model.population"} == set(decided) - {"checkpoint.every_n_train_steps"}


@pytest.mark.parametrize("name", sorted(TINA))
def test_recipe_inherits_with_dotted_overrides_only(name):
    """After `config:`, a nested section would replace the inherited section whole (jsonargparse), so refuse it."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    keys = list(raw)
    assert keys[0] == "config", f"{name}.yaml must start with `config: <parent>.yaml`"
    assert (RECIPES / raw["config"]).is_file()
    nested = [k for k in keys[1:] if "." not in k and k != "seed_everything"]
    assert not nested, (
        f"{name}.yaml: write {nested} as dotted keys (e.g. model.optim.lr), not nested sections"
    )


@pytest.mark.parametrize("name", sorted(TINA))
def test_print_config_matches_tina(name):
    cfg = print_config("--config", str(RECIPES / f"{name}.yaml"))
    for key, want in expected(name).items():
        got = _get(cfg, key)
        if (
            key == "model.rewards"
        ):  # the recipe may add more kwargs (e.g. the grading mode) than Tina's launcher
            got = [
                {**r, "kwargs": {k: v for k, v in r["kwargs"].items() if k in w["kwargs"]}}
                for r, w in zip(got, want, strict=False)
            ]
        assert got == want, f"{name}: {key} = {got!r}, Tina's recipe gives {want!r}"
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
    assert callbacks == ["AdapterCheckpoint", "ResumeCheckpoint", "CostTracker"]
    assert cfg["trainer"]["logger"]["init_args"]["name"] == name


def _tiny_args(name: str, tmp_path: Path) -> list[str]:
    """Overrides that shrink a recipe to the embedded tiny model on CPU (model, data, lengths, precision, engine)."""
    g = expected(name)["model.grpo.num_generations"]
    args = [
        "--config", str(RECIPES / f"{name}.yaml"),
        "--model.model", str(TINY), "--model.dtype", "float32", "--model.attn_implementation", "null",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.chat_template", "null", "--data.max_prompt_length", "64",
        "--model.grpo.batch_size", str(g), "--rollout.engine", "hf", "--rollout.sampling.max_new_tokens", "16",
    ]  # fmt: skip
    if name.startswith("l1_"):  # the l1 rewards read a per-row target_length: local rows that carry one
        from lightning_tina.tiny.task import train_rows

        rows = tmp_path / "l1_rows.jsonl"
        with rows.open("w") as f:
            for i, row in zip(range(64), train_rows(0), strict=False):
                f.write(
                    json.dumps({"problem": row["problem"], "answer": row["answer"], "target_length": 20 + i})
                    + "\n"
                )
        return [*args, "--data.source", str(rows), "--data.columns", '{"target_length": "target_length"}',
                "--data.system_prompt", "none"]  # fmt: skip
    return [*args, "--data.source", "tiny_arithmetic"]


def _one_step(name: str, tmp_path: Path) -> None:
    if not TINY.exists():
        pytest.skip(f"the embedded tiny model {TINY} is not built yet")
    want = expected(name)
    cli = cli_main(["fit", *_tiny_args(name, tmp_path)])
    assert cli.trainer.global_step == 1
    m = cli.model
    assert m.policy.peft_config["default"].r == want["model.lora.r"]
    assert m.policy.peft_config["default"].lora_alpha == want["model.lora.alpha"]
    assert [s.name for s in m.reward_specs] == [r["name"] for r in want["model.rewards"]]
    assert (m.grpo.scale_rewards, m.grpo.loss_type) == (
        want["model.grpo.scale_rewards"],
        want["model.grpo.loss_type"],
    )
    assert m.optim.lr == want["model.optim.lr"]
    rollout = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RolloutCallback")
    assert (
        rollout.sampling.temperature == want["model.grpo.temperature"]
    )  # linked from model.grpo.temperature
    adapters = list((tmp_path / "runs" / name).rglob("adapter_model.safetensors"))
    assert adapters, "AdapterCheckpoint wrote no adapter"
    cost = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CostTracker")
    assert cost.summary is not None and cost.summary.train.hours > 0
    assert "train/loss" in cli.trainer.logged_metrics and "cost/total_usd" in cli.trainer.logged_metrics


REPRESENTATIVE = ["open_rs3", "limr_large_rank_ablation", "l1_exact"]
"""Fast suite: cosine + G=6 + a restated callback list; two levels of inheritance + rank 128; local l1 rows."""


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_recipes_run_one_step_on_the_tiny_model(name, tmp_path):
    _one_step(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(TINA) - set(REPRESENTATIVE)))
def test_every_recipe_runs_one_step_on_the_tiny_model(name, tmp_path):
    _one_step(name, tmp_path)


def test_tina_eval_preset_grades_as_tina_with_lightevals_double_bos():
    """configs/eval/tina.yaml: Tina's (lighteval-compatible) grading is the headline, strict the second column;
    lighteval at Tina's pin (ed084813) tokenized the chat-templated prompt with special tokens (a second BOS)."""
    from lightning_tina.evaluate import _parser

    args = _parser().parse_args(
        ["--config", str(ROOT / "configs/eval/tina.yaml"), "--model", "m", "--out", "o"]
    )
    assert args.grading == "tina" and args.compare_modes is True and args.double_bos is True
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.6, 0.95, 32768)
