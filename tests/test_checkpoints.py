"""Adapter checkpoints (PEFT layout), merge-and-export, and the bad inputs each refused with a clear message."""

import json
from pathlib import Path

import pytest
import torch

from lightning_tina.__main__ import cli_main
from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.export import main as export_main
from lightning_tina.module import GRPOModule
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "data" / "tiny")
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A PEFT adapter with non-zero weights, as AdapterCheckpoint writes it."""
    out = tmp_path_factory.mktemp("adapter")
    model = wrap_lora(load_causal_lm(TINY), LoRASettings(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def test_adapter_loads_with_peft_and_changes_outputs(adapter_dir):
    from peft import PeftModel

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    base = load_causal_lm(TINY).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


def test_export_merges_and_matches_adapter_logits(adapter_dir, tmp_path, capsys):
    diff = export_main(["--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"), "--base", TINY])
    assert diff <= 1e-4
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # a plain model, not an adapter
    assert "max |logit difference|" in capsys.readouterr().out


def test_export_refuses_folder_without_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        export_main(["--adapter", str(tmp_path), "--out", str(tmp_path / "o")])


def _checkpoint_of(module: GRPOModule) -> dict:
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    return ckpt


def test_checkpoint_keeps_only_adapter_weights():
    m = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8))
    m.configure_model()
    ckpt = _checkpoint_of(m)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_checkpoint_of_other_rank_is_refused():
    a = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8))
    a.configure_model()
    b = GRPOModule(model=TINY, lora=LoRASettings(r=8, alpha=8))
    b.configure_model()
    with pytest.raises(ValueError, match=r"trained with model.lora.r=4 but this run has model.lora.r=8"):
        b.on_load_checkpoint(_checkpoint_of(a))


def test_checkpoint_of_other_base_model_is_refused():
    a = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8))
    a.configure_model()
    ckpt = _checkpoint_of(a)
    ckpt["hyper_parameters"]["model"] = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    with pytest.raises(ValueError, match="model.model='deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'"):
        a.on_load_checkpoint(ckpt)


def test_checkpoint_without_adapter_weights_is_refused():
    a = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8))
    a.configure_model()
    ckpt = _checkpoint_of(a)
    ckpt["state_dict"] = {}
    with pytest.raises(ValueError, match="has no weights for"):
        a.on_load_checkpoint(ckpt)


def test_missing_ckpt_path_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*nope.ckpt: no such file"):
        cli_main(["fit", "--config", TINY_YAML, "--ckpt_path", str(tmp_path / "nope.ckpt")])


def test_truncated_ckpt_is_refused(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="bad.ckpt is truncated or not a checkpoint"):
        cli_main(["fit", "--config", TINY_YAML, "--ckpt_path", str(bad)])


def test_missing_dataset_path_is_refused(tmp_path):
    dm = ReasoningDataModule(source=str(tmp_path / "missing.jsonl"), tokenizer=TINY)
    with pytest.raises((FileNotFoundError, ValueError), match="missing.jsonl"):
        dm.setup("fit")


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    dm = ReasoningDataModule(tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="no chat template"):
        dm.setup("fit")
