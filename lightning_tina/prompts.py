"""Tina's system prompts and chat template, and the one function that renders a training prompt.

Tina (shangshang-wang/Tina, `tina/utils/prompt.py` and `tina/utils/chat_template.py`) trains with one of two system
prompts and overrides the tokenizer's chat template with the DeepSeek-R1 template below. The strings are kept byte for
byte as Tina has them, quirks included, because the prompt tokens are part of what the adapter learns.
"""

from __future__ import annotations

from typing import Any

OPEN_R1_SYSTEM_PROMPT = (
    "\nYou are a helpful AI Assistant that provides well-reasoned and detailed responses.\n"
    "You first think about the reasoning process as an internal monologue and then provide the user with the answer.\n"
    "Respond in the following format: <think>\n...\n</think>\n<answer>\n...\n</answer>\n"
)
"""Tina's default system prompt (from open-r1's GRPO demo recipe); used for every dataset but knoveleng/open-rs."""

# Tina writes `\\boxed{{}}` in a plain (non-f) string, so the model really sees the doubled braces `\boxed{{}}`; the
# trailing space after "respectively," is also Tina's.
OPEN_RS_SYSTEM_PROMPT = (
    "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer, "
    "and put your final answer within \\boxed{{}} .\n"
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, \n"
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "Note that respond by English, NOT use other languages.\n"
)
"""Tina's system prompt for the open-rs data (knoveleng/open-rs: open_rs2, open_rs3), from knoveleng/open-rs."""

SYSTEM_PROMPTS: dict[str, str | None] = {
    "open_r1": OPEN_R1_SYSTEM_PROMPT,
    "open_rs": OPEN_RS_SYSTEM_PROMPT,
    "none": None,
}
"""Named system prompts a config may refer to; "none" means no system message at all."""

# DeepSeek-R1's own chat template as Tina pins it (`REASON_CHAT_TEMPLATE`): BOS, the system text with no role marker,
# then <｜User｜>problem<｜Assistant｜>. Unlike the newer DeepSeek-R1-Distill tokenizer template it does not append
# "<think>\n" after the assistant marker.
TINA_R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool["
    "'function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '"
    "<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n'"
    " + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
"""Tina's DeepSeek-R1 chat template (Jinja), byte-identical to `REASON_CHAT_TEMPLATE` in Tina."""

CHAT_TEMPLATES: dict[str, str | None] = {
    "tina_r1": TINA_R1_CHAT_TEMPLATE,
    "tokenizer": None,
}
"""Named chat templates a config may refer to; "tokenizer" means the tokenizer's own template."""


def resolve_system_prompt(value: str | None) -> str | None:
    """Turn a config value into system prompt text: a name from SYSTEM_PROMPTS, or any other string verbatim."""
    if value is None:
        return None
    return SYSTEM_PROMPTS[value] if value in SYSTEM_PROMPTS else value


def resolve_chat_template(value: str | None) -> str | None:
    """Turn a config value into a Jinja template: a name from CHAT_TEMPLATES, or a template string verbatim.

    None (and "tokenizer") mean "use the tokenizer's own template".
    """
    if value is None:
        return None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" not in value and "{%" not in value:
        raise ValueError(
            f"chat_template {value!r} is neither a known name ({sorted(CHAT_TEMPLATES)}) nor a Jinja template; "
            "set it to one of those names or paste the template text."
        )
    return value


def build_messages(problem: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation Tina sends: an optional system message, then the problem as the user message."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": problem})
    return messages


def render_prompt(
    tokenizer: Any, problem: str, system_prompt: str | None, chat_template: str | None = None
) -> str:
    """Render one prompt string with the generation prompt appended (ready to tokenize and sample from).

    `chat_template` is a name from CHAT_TEMPLATES, a Jinja string, or None for the tokenizer's own template.
    The result still contains the template's BOS text, so tokenize it with `add_special_tokens=False`.
    """
    template = resolve_chat_template(chat_template)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template; "
            "set chat_template (e.g. 'tina_r1', Tina's DeepSeek-R1 template) in the data config."
        )
    rendered = tokenizer.apply_chat_template(
        build_messages(problem, system_prompt),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
