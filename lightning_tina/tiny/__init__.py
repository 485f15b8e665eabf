"""mini-Tina: a generated multi-step arithmetic task and the tiny Qwen2 base model shipped in ``data/tiny``.

``task`` generates problems, the train/held-out split and reference completions; ``build`` makes the tokenizer and
SFT-trains the deliberately imperfect base model that ``configs/tiny.yaml`` improves with GRPO + LoRA.
"""
