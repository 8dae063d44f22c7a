"""Prompt templates for instruction data: plain strings with `{instruction}` and `{input}` fields.

Torch-free, so a recipe's template is checked with the rest of the recipe, before any loading.
"""

from __future__ import annotations

import re

from llmcli.console import fail

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)
# Alpaca's layout without its preamble: for small contexts (the tiny demo sees 64 tokens).
ALPACA_SHORT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATES = {"alpaca": ALPACA, "alpaca-short": ALPACA_SHORT}
_FIELD = re.compile(r"\{(instruction|input)\}")
_ANY_FIELD = re.compile(r"\{\w+\}")


def template_problem(spec: str) -> str | None:
    """What is wrong with a template name or string, or None: checked with the recipe."""
    text = TEMPLATES.get(spec, spec)
    if "{instruction}" not in text:
        return (f"{spec!r} is neither a template name ({', '.join(TEMPLATES)}) nor a string "
                "containing {instruction}; add the {instruction} field")
    unknown = sorted({m.group(0) for m in _ANY_FIELD.finditer(text)} - {"{instruction}",
                                                                         "{input}"})
    if unknown:  # a misspelt {input} would be trained on as text, and the input lost
        return (f"unknown field {', '.join(unknown)}; a template fills only {{instruction}} "
                "and {input}")
    return None


def resolve_template(spec: str) -> str:
    """A template name ('alpaca') or a template string -> the template string."""
    problem = template_problem(spec)
    if problem is not None:
        fail(f"finetune.template: {problem}")
    return TEMPLATES.get(spec, spec)


def render_prompt(template: str, instruction: str, input: str = "") -> str:  # noqa: A002
    """The prompt a model sees before its answer.

    With an empty input, the paragraph (text between blank lines) that holds `{input}` but not
    `{instruction}` is left out, so Alpaca's "### Input:" block appears only when there is one.
    Fields are filled in one pass: braces inside the user's text are never read as fields.
    """
    text = resolve_template(template)
    if not input.strip() and "{input}" in text:
        paragraphs = text.split("\n\n")
        kept = [p for p in paragraphs if "{input}" not in p or "{instruction}" in p]
        text = "\n\n".join(kept)
    values = {"instruction": instruction, "input": input}
    return _FIELD.sub(lambda m: values[m.group(1)], text)
