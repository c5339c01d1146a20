"""Chat messages rendered through the model's own chat template.

Rules for a message list (each broken rule is a ValueError that names the message and field):

- the list is non-empty;
- each message is a mapping with exactly the keys `role` and `content`;
- `role` is one of VALID_ROLES: `system`, `user`, `assistant` and `tool` (a tool's result fed back to the
  model). These are the roles that the common chat templates (ChatML, Qwen, Llama) know; anything else is
  refused here rather than silently rendered or mangled by a template;
- `content` is a string, or a list of text parts `{"type": "text", "text": str}` (the OpenAI shape), which
  are joined into one string, so templates only ever see strings.

The prompt is the template rendered with `add_generation_prompt=True`, then encoded without adding special
tokens, because the template already writes any BOS or special markers it wants. As in transformers, a
special token's text inside a content (`<|im_end|><|im_start|>system ...`) encodes as that control token: a
caller can write turns of its own. `--chat-special-tokens refuse` refuses such contents (special_token_texts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

VALID_ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = frozenset({"role", "content"})


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ValueError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, got {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check a chat message list; return it normalised to [{"role": str, "content": str}, ...]."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must contain at least one message")
    normalised = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a mapping with 'role' and 'content', got {type(message).__name__}"
            )
        unknown = sorted(str(k) for k in message.keys() - _MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed keys are 'role' and 'content'")
        if "role" not in message:
            raise ValueError(f"{where}.role is required; valid roles are {', '.join(VALID_ROLES)}")
        if "content" not in message:
            raise ValueError(f"{where}.content is required")
        role = message["role"]
        if role not in VALID_ROLES:
            raise ValueError(
                f"{where}.role {role!r} is not a valid role; valid roles are {', '.join(VALID_ROLES)}"
            )
        normalised.append({"role": role, "content": _content_text(message["content"], where)})
    return normalised


def render_chat(tokenizer: Any, messages: object, enable_thinking: bool | None = None) -> str:
    """Validate `messages` and render them through the tokenizer's chat template, ending in the assistant's turn.

    enable_thinking (None: the template's default) is passed to templates with a thinking switch (Qwen3's);
    setting it for a template without one is refused rather than silently ignored.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "messages are not supported: the model's tokenizer has no chat template; send a prompt"
        )
    normalised = validate_messages(messages)
    extra: dict[str, bool] = {}
    if enable_thinking is not None:
        sources = template.values() if isinstance(template, Mapping) else [template]
        if not any("enable_thinking" in str(source) for source in sources):
            raise ValueError("chat.enable_thinking is set, but the model's chat template has no thinking switch "
                             "(it never reads enable_thinking); leave it unset for this model")
        extra["enable_thinking"] = enable_thinking
    # Imported here so that importing this module does not need jinja2 until a template is rendered.
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        text = tokenizer.apply_chat_template(normalised, tokenize=False, add_generation_prompt=True, **extra)
    except TemplateSyntaxError:
        raise  # the model's template is broken, not the request (start-up checks it: check_chat_template)
    except TemplateError as e:
        # Templates reject some conversations themselves (e.g. "roles must alternate"); that is bad input.
        raise ValueError(f"messages rejected by the model's chat template: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def check_chat_template(tokenizer: Any) -> None:
    """ValueError when the tokenizer's chat template does not compile (a broken tokenizer_config.json or
    chat_template.jinja): said at start-up, not as every chat request's INVALID_ARGUMENT."""
    if not getattr(tokenizer, "chat_template", None):
        return
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the tokenizer's chat template does not compile: {exc} (line {exc.lineno}); fix the "
                         "chat_template in tokenizer_config.json or chat_template.jinja") from None
    except Exception:  # noqa: S110 -- it compiles; what it makes of a lone user message is the requests' business
        pass


def special_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (what --chat-special-tokens refuse looks for in contents)."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {token.content for token in decoder.values() if getattr(token, "special", False)}
    return tuple(sorted(t for t in texts if t))


def encode_chat(tokenizer: Any, messages: object, enable_thinking: bool | None = None) -> list[int]:
    """Render `messages` (see render_chat) and return the prompt's token ids."""
    return list(tokenizer.encode(render_chat(tokenizer, messages, enable_thinking), add_special_tokens=False))
