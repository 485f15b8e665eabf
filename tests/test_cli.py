"""The real CLI: every config parses, overrides and links work, and `fit` runs end to end on the tiny model."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from lightning_tina.__main__ import cli_main

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "eval" not in p.parts)


def _print_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_fit_configs_cover_every_folder():
    """configs/population/ and the Tina population recipes are parsed below like every other fit config."""
    folders = {p.parent.name for p in FIT_CONFIGS}
    assert {"configs", "tina", "options", "population"} <= folders
    names = {p.relative_to(ROOT / "configs").as_posix() for p in FIT_CONFIGS}
    assert {
        "population/tiny_lr.yaml",
        "tina/limr_rank_population.yaml",
        "tina/limr_lr_population.yaml",
    } <= names


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_fit_config_parses(config):
    cfg = _print_config("--config", str(config))
    assert cfg["model"]["grpo"]["batch_size"] % cfg["model"]["grpo"]["num_generations"] == 0
    population = cfg["model"].get("population")
    if population:  # each member's overrides resolve against the shared sections, as the module does
        from lightning_tina.optim import OptimSettings
        from lightning_tina.policy import LoRASettings
        from lightning_tina.population import AdapterSettings, resolve_population

        optim = dict(cfg["model"]["optim"], betas=tuple(cfg["model"]["optim"]["betas"]))
        members = resolve_population(
            [AdapterSettings(**m) for m in population],
            LoRASettings(**cfg["model"]["lora"]),
            OptimSettings(**optim),
        )
        assert [m.name for m in members] == [m["name"] for m in population]
        assert not cfg["model"]["grpo"].get("dynamic_sampling")  # refused with two or more adapters
        assert cfg["rollout"]["engine"] != "vllm" or cfg["rollout"]["vllm"]["weight_sync"] != "merged"


def test_overrides_and_links():
    cli = cli_main(
        [
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--model.lora.r",
            "16",
            "--trainer.max_steps",
            "5",
            "--model.grpo.num_generations",
            "4",
            "--model.grpo.batch_size",
            "32",
            "--model.grpo.temperature",
            "0.7",
        ],
        run=False,
    )
    assert cli.model.lora.r == 16 and cli.trainer.max_steps == 5
    # set once, linked everywhere: group size, prompts per step, tokenizer, temperature
    rollout = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RolloutCallback")
    assert cli.datamodule.prompts_per_step == 8
    assert rollout.num_generations == 4
    assert cli.datamodule.tokenizer_name == cli.model.model_name
    assert rollout.sampling.temperature == 0.7


def test_checkpoint_section_sets_the_save_periods_and_the_newcomer_surface():
    """One value in `checkpoint:` sets a period without restating trainer.callbacks; the trainer gets the step
    progress bar and no TensorBoard hp_metric placeholder."""
    from lightning_tina.callbacks import AdapterCheckpoint, ResumeCheckpoint, TinaProgressBar

    cli = cli_main(
        ["--config", str(ROOT / "configs/tiny.yaml"), "--checkpoint.every_n_train_steps", "7"]
        + ["--checkpoint.resume_every_n_train_steps", "3"],
        run=False,
    )
    adapters = next(c for c in cli.trainer.callbacks if isinstance(c, AdapterCheckpoint))
    resume = next(c for c in cli.trainer.callbacks if isinstance(c, ResumeCheckpoint))
    assert adapters.every_n_train_steps == 7 and resume._every_n_train_steps == 3
    assert any(isinstance(c, TinaProgressBar) for c in cli.trainer.callbacks)
    assert cli.trainer.logger._default_hp_metric is False


def test_old_period_key_still_works_and_names_the_new_one():
    from lightning_tina.callbacks import AdapterCheckpoint, BenchmarkEval

    with pytest.warns(FutureWarning, match="every_n_train_steps"):
        assert AdapterCheckpoint(every_n_steps=5).every_n_train_steps == 5
    with pytest.raises(ValueError, match="set only every_n_train_steps"):
        BenchmarkEval(["tiny_heldout"], every_n_train_steps=2, every_n_steps=3)


def test_a_config_mistake_is_one_line_naming_the_key(monkeypatch, capsys):
    from lightning_tina import __main__ as cli

    args = ["lightning_tina", "fit", "--config", str(ROOT / "configs/tiny.yaml")]
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr("sys.argv", [*args, "--model.grpo.batch_size", "10"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert "model.grpo.batch_size=10" in err[-1] and cli.DEBUG_ENV in err[-1]
    monkeypatch.setattr("sys.argv", [*args, "--model.model", "./no/such/model"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "model.model: no such directory './no/such/model'" in capsys.readouterr().err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cli.main()


def test_unknown_key_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.lora.rank", "4"])
    assert "rank" in capsys.readouterr().err


def test_fit_two_steps_writes_tensorboard(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["trainer"]["max_steps"] = 2
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    bench = cfg["trainer"]["callbacks"][0]["init_args"]
    bench.update(limit=4, k=2, every_n_train_steps=0)
    cfg["model"]["grpo"].update(batch_size=16)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/reward", "train/kl", "train/lr", "rewards/accuracy/mean", "bench/tiny_heldout/pass@1"):
        assert tag in tags, (tag, sorted(tags))


def test_validate_scores_the_held_out_prompts(tmp_path):
    cli = cli_main(
        [
            "validate", "--config", str(ROOT / "configs/tiny.yaml"), "--data.val_size", "8",
            "--model.eval.k", "2", "--model.eval.max_new_tokens", "96", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/pass@1"]) <= float(metrics["val/pass@2"]) <= 1.0
