"""lightning_tina: tiny reasoning models via LoRA GRPO (Tina), as a PyTorch Lightning codebase."""

__version__ = "0.1.0"
