"""What a fresh `pip install -e .[gpu]` must be able to load (issue 17): the recipes' attention kernel is PyTorch's
own, and a kernel that is not installed is refused with a message naming model.attn_implementation and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_tina.policy import check_attention, load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


def test_the_recipes_default_attention_needs_nothing_extra() -> None:
    base = yaml.safe_load((ROOT / "configs" / "tina" / "base.yaml").read_text())
    assert base["model"]["attn_implementation"] == "sdpa"
    for name in ("sdpa", "eager", None, "lightning_tina_cpu"):
        check_attention(name)


def test_a_missing_attention_kernel_names_the_setting_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils as tu

    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(
        ImportError, match=r"model.attn_implementation='flash_attention_2' needs .*flash-attn"
    ) as e:
        check_attention("flash_attention_2")
    assert "model.attn_implementation: sdpa" in str(e.value)
    with pytest.raises(ImportError, match="model.attn_implementation='flash_attention_2'"):
        load_causal_lm(str(ROOT / "data" / "tiny"), "float32", "flash_attention_2")  # before any loading
    monkeypatch.setattr(tu, "is_flash_attn_2_available", lambda: True)
    check_attention("flash_attention_2")  # installed: transformers takes it from here
    monkeypatch.setattr(tu, "is_kernels_available", lambda: False)
    with pytest.raises(ImportError, match="`kernels` package"):
        check_attention("kernels-community/flash-attn")
