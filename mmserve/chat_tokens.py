"""Prompt length before any media work: the checkpoint's chat template rendered and tokenised without torch.

The router counts a request's text tokens with the `tokenizers` library and the template with jinja2 (as
transformers renders it), so a prompt that cannot fit the context is refused before decode, encode or
admission. The llm builds the real prompt the same way; the llm's own length check stays authoritative.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


@dataclasses.dataclass(frozen=True)
class PromptCount:
    """A prompt's tokens: text (placeholders excluded) and where each media item's tokens go."""

    num_text_tokens: int
    num_media: int


class ChatTokenCounter:
    """Renders a conversation with the checkpoint's chat template and counts its tokens."""

    def __init__(self, model_dir: str | pathlib.Path):
        model_dir = pathlib.Path(model_dir)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        settings = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.template = _environment().from_string(_chat_template(model_dir, settings))
        self.special_tokens = {name: _token_text(settings.get(name)) for name in
                               ("bos_token", "eos_token", "pad_token", "unk_token")}
        config = json.loads((model_dir / "config.json").read_text())
        self.placeholder_ids = frozenset(config[name] for name in ("image_token_id", "video_token_id")
                                         if name in config)

    def render(self, conversation: list[dict[str, Any]]) -> str:
        """The chat template's text of a conversation, ending with the assistant turn's header."""
        return self.template.render(messages=conversation, add_generation_prompt=True, **self.special_tokens)

    def count(self, conversation: list[dict[str, Any]]) -> PromptCount:
        """Tokens of a conversation in transformers' content-list form ({"type": "text"|"image"|"video"})."""
        ids = self.tokenizer.encode(self.render(conversation), add_special_tokens=False).ids
        num_media = sum(1 for i in ids if i in self.placeholder_ids)
        return PromptCount(len(ids) - num_media, num_media)

    def count_expanded(self, conversation: list[dict[str, Any]], family, items: list) -> PromptCount:
        """Tokens of the prompt the llm builds for these planned items: the family's markup around each
        (expand_prompt: Qwen3-VL's timestamps, InternVL's <img> and frame labels) and its pads repeated to the
        items' rows (expand_ids); ValueError when the text's placeholders do not match the items."""
        ids = self.tokenizer.encode(family.expand_prompt(self.render(conversation), items),
                                    add_special_tokens=False).ids
        num_tokens = len(family.expand_ids(ids, items))
        return PromptCount(num_tokens - sum(family.num_tokens(item) for item in items), len(items))


def _chat_template(model_dir: pathlib.Path, settings: dict) -> str:
    """The template as transformers finds it: chat_template.jinja, chat_template.json, or tokenizer_config."""
    if (path := model_dir / "chat_template.jinja").is_file():
        return path.read_text()
    if (path := model_dir / "chat_template.json").is_file():
        return json.loads(path.read_text())["chat_template"]
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next(t["template"] for t in template if t.get("name") == "default")
    if not template:
        raise ValueError(f"model: {model_dir} has no chat template")
    return template


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> jinja2.Environment:
    # The settings transformers renders chat templates with, so both sides produce the same text.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
