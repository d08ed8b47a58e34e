"""Chat templates: messages -> one string, plus where the trained answers are in it.

`render(messages, tokenizer, template)` returns `(text, spans)`, where `spans`
are the character ranges [start, end) of every assistant message. Each span
covers the answer *and* its end-of-turn marker, so the model learns to stop.
Tokens are masked later from these character spans (see tokenize.py).

`tokenizer` - the tokenizer's own chat template (`apply_chat_template`).
              Spans are found by rendering prefixes of the conversation.

`vicuna`    - FastChat's vicuna_v1.1, as Thakkar et al. (2024) use for Vicuna:

    A chat between a curious user and an artificial intelligence assistant. The assistant gives
    helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>USER: ...

    (a system message in the data replaces the default system line)

`mistral`   - Mistral-Instruct:

    <s>[INST] Hi [/INST] Hello!</s>[INST] How are you? [/INST] Fine.</s>

    (a system message is put before the first user message, then a blank line)

For vicuna and mistral, "<s>" / "</s>" are the tokenizer's own bos / eos
strings when it has them, so they become its special tokens.
"""
from __future__ import annotations

TEMPLATES = ("tokenizer", "vicuna", "mistral")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render(messages: list[dict], tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Full text of the conversation and the [start, end) character spans of the assistant turns."""
    if template == "tokenizer":
        return _render_own(messages, tokenizer)
    if template == "vicuna":
        return _render_vicuna(messages, tokenizer)
    if template == "mistral":
        return _render_mistral(messages, tokenizer)
    raise ValueError(f"data.template: unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def _special(tokenizer, name: str, default: str) -> str:
    return getattr(tokenizer, name, None) or default


def _render_own(messages, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template: the tokenizer has no chat template; use template: vicuna or mistral")

    def text_of(msgs, gen_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    full = text_of(messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        # Everything up to "<assistant header>" is the prompt; the turn itself
        # ends where the conversation truncated after this message ends.
        before = text_of(messages[:i], gen_prompt=True)
        upto = text_of(messages[: i + 1])
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            raise ValueError("data.template: the tokenizer's chat template renders a conversation differently "
                             "from its prefixes, so answer spans cannot be found; use template: vicuna")
        spans.append((len(before), len(upto)))
    return full, spans


def _render_vicuna(messages, tokenizer):
    eos = _special(tokenizer, "eos_token", "</s>")
    system = VICUNA_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text, spans = system + " ", []
    for msg in messages:
        if msg["role"] == "user":
            text += f"USER: {msg['content']} ASSISTANT: "
        else:
            start = len(text)
            text += msg["content"] + eos
            spans.append((start, len(text)))
    return text, spans


def _render_mistral(messages, tokenizer):
    bos = _special(tokenizer, "bos_token", "<s>")
    eos = _special(tokenizer, "eos_token", "</s>")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text, spans = bos, []
    for msg in messages:
        if msg["role"] == "user":
            content = msg["content"]
            if system is not None:
                content, system = f"{system}\n\n{content}", None
            text += f"[INST] {content} [/INST] "
        else:
            start = len(text)
            text += msg["content"] + eos
            spans.append((start, len(text)))
    return text, spans
