"""Prompt templates, for training (an example's segments) and for evaluation (a prompt to generate from).

Rendering is where templates apply: alpaca (the paper's), chat (the tokenizer's chat template) or none."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DataError, TemplateError

if TYPE_CHECKING:
    from .formats import Example

# The paper's training script's PROMPT_DICT (Stanford Alpaca's): the prompt ends with "### Response:" and no
# newline, and the response follows directly, EOS appended as text. Earlier asft versions added a newline here.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

TEMPLATES = ("auto", "alpaca", "chat", "none")


def resolve_template(template: str, tokenizer) -> str:
    """auto -> chat when the tokenizer has a chat template, else alpaca; for training and evaluation alike."""
    if template not in TEMPLATES:
        raise TemplateError(f"template: unknown value {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template: 'chat' needs a tokenizer with a chat template; use --template alpaca or none")
    return template


def conversation_field(example: Example) -> str:
    return "conversations" if example.format == "sharegpt" else "messages"


def render(example: Example, template: str, tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, trainable) segments under a template; the response ends with EOS."""
    if template == "chat":
        return _render_chat(example, tokenizer)
    if example.segments is None:  # a conversation under a plain template: only one exchange fits
        turns = [t for t in example.messages if t["role"] != "system"]
        if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise DataError(
                example.source,
                example.line,
                conversation_field(example),
                f"a multi-turn conversation needs --template chat (got template {template!r})",
            )
        segments = [(turns[0]["content"], False), (turns[1]["content"], True)]
        if template == "alpaca":
            segments[0] = (ALPACA_PROMPT.format(instruction=segments[0][0]), False)
    else:  # alpaca rows carry their template; prompt/completion rows are used as written (as TRL does)
        segments = list(example.segments)
    text, _ = segments[-1]
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        segments[-1] = (text + tokenizer.eos_token, True)
    return segments


def _render_chat(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """Split a chat-template rendering into prompt parts and assistant turns (each trained)."""
    messages, segments, done = example.messages, [], ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(
                example.source,
                example.line,
                conversation_field(example),
                "the tokenizer's chat template does not render turns incrementally",
            )
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    text = segments[-1][0]
    if tokenizer.eos_token and tokenizer.eos_token not in text:
        segments[-1] = (text + tokenizer.eos_token, True)
    return [(t, trainable) for t, trainable in segments if t]


# `--template alpaca` at evaluation: the paper's *evaluation* prompt, which (unlike its training script, whose text
# asft train renders: ALPACA_PROMPT) ends with "### Response:" plus a newline. Kept so that figures compare with the
# paper's; the one-token difference is stated in --help and in results.json.
ALPACA_TEMPLATE = ALPACA_PROMPT + "\n"
ALPACA_TEMPLATE_WITH_INPUT = ALPACA_PROMPT_WITH_INPUT + "\n"
ALPACA_NOTE = (
    "alpaca: the paper's evaluation prompt, ending '### Response:' + newline (its training prompt, used "
    "by asft train, has no newline)"
)


def render_prompt(prompt: str, template: str, tokenizer, input: str = "") -> str:
    """A prompt to generate from (evaluation, RL) under a resolved template."""
    if template == "chat":
        content = prompt + (f"\n\n{input}" if input.strip() else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template == "alpaca":
        if input.strip():
            return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=prompt, input=input)
        return ALPACA_TEMPLATE.format(instruction=prompt)
    return prompt + (f"\n\n{input}" if input.strip() else "")


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, with BOS the way the training data code adds it (never twice)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids
