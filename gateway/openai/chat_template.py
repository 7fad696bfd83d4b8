"""Chat templates: a model package's Jinja template turns messages into the prompt text, with
Hugging Face's semantics (`transformers` `apply_chat_template`), so templates written for HF
models render the same here.

A template is code from a model package, and packages can come from anyone who may publish to
the registry, so it runs in Jinja's `ImmutableSandboxedEnvironment`: no attribute access to
internals (`__class__`, `__globals__`, ...) and no mutation of the values passed in. Each
template is compiled once and cached by its source text; rendering is then a function call.

A model without a template is refused (`NoChatTemplate`) rather than fed a made-up "role:
content" join: a base model has never seen such a format, and a plausible-looking but wrong
prompt fails silently where an error tells the user to call /v1/completions instead.
`transformers` made the same choice in v4.44 (no default template).

Errors, for the app's status table:

    error                meaning                                             HTTP
    TemplateRaised       the template called raise_exception (e.g. a         400
                         "system message must come first" rule)
    NoChatTemplate       the model has no template: use /v1/completions      400
    TemplateUnsafe       the template tried something the sandbox forbids    500
    ChatTemplateError    any other failure: the package's template is broken 500
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
from jinja2.exceptions import SecurityError


class ChatTemplateError(Exception):
    """The template failed to compile or render; the model package needs fixing."""


class TemplateRaised(ChatTemplateError):
    """The template refused these messages through `raise_exception(message)`."""


class TemplateUnsafe(ChatTemplateError):
    """The template tried an operation the sandbox forbids."""


class NoChatTemplate(ChatTemplateError):
    """The model package has no chat template."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # HF's filter: unlike Jinja's own `tojson`, it does not HTML-escape, so prompts keep "<", "&"
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    # HF's global, used by templates that put today's date in the system prompt
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from None


class ChatTemplate:
    """A model's compiled chat template plus the special tokens templates refer to."""

    def __init__(self, source: str | None, *, bos_token: str | None = None, eos_token: str = ""):
        if not source:
            raise NoChatTemplate(
                "this model has no chat template; send plain text to /v1/completions instead"
            )
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}], see
        `validation.template_messages`); `add_generation_prompt` opens the assistant's turn."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise TemplateUnsafe(f"chat template refused by the sandbox: {e}") from None
        except Exception as e:  # a broken template can fail in any way Python code can
            raise ChatTemplateError(
                f"chat template failed to render: {type(e).__name__}: {e}"
            ) from None
