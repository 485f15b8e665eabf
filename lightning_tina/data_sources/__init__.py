"""Training data for GRPO: which dataset (registry, hub id or local file), how to read it, how to normalize it.

Flow: DataSource (config) -> resolve() -> DatasetEntry -> iter_raw_rows() -> normalize() -> {"problem", "solution",
...} -> prompts.render_prompt(tokenizer, row["problem"], system_prompt_for(entry, row), chat_template).
"""

from lightning_tina.data_sources.loading import buffer_shuffle, iter_raw_rows
from lightning_tina.data_sources.normalize import (
    DataValidationError,
    RowError,
    answer_parse_status,
    get_path,
    last_boxed,
    normalize,
    row_rng,
    validate_head,
    wrap_math,
)
from lightning_tina.data_sources.registry import (
    REGISTRY,
    DatasetEntry,
    DataSource,
    resolve,
    system_prompt_for,
)

__all__ = [
    "REGISTRY",
    "DataSource",
    "DataValidationError",
    "DatasetEntry",
    "RowError",
    "answer_parse_status",
    "buffer_shuffle",
    "get_path",
    "iter_raw_rows",
    "last_boxed",
    "normalize",
    "resolve",
    "row_rng",
    "system_prompt_for",
    "validate_head",
    "wrap_math",
]
