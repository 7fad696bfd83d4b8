"""Chat templates render with HF semantics, in a sandbox, and fail with typed errors."""

from __future__ import annotations

import pytest

from gateway.openai.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    NoChatTemplate,
    TemplateRaised,
    TemplateUnsafe,
)
from trainer.tokenizer import CHATML_TEMPLATE

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi <b> & bye"},
]


def test_chatml_renders_like_smollm2():
    t = ChatTemplate(CHATML_TEMPLATE, eos_token="<|im_end|>")
    assert t.render(MESSAGES) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi <b> & bye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert t.render(MESSAGES, add_generation_prompt=False).endswith("bye<|im_end|>\n")


def test_hf_globals_filters_and_whitespace():
    # trim_blocks/lstrip_blocks, bos_token, HF's non-escaping tojson, loop controls
    source = """
    {{ bos_token }}
    {% for m in messages %}
        {% if loop.index > 1 %}{% break %}{% endif %}
        {{ m | tojson }}
    {% endfor %}
    """
    out = ChatTemplate(source, bos_token="<s>").render(MESSAGES)
    assert out.split() == [
        "<s>",
        '{"role":',
        '"system",',
        '"content":',
        '"You',
        "are",
        'helpful."}',
    ]


def test_compiled_once_per_source():
    a, b = ChatTemplate(CHATML_TEMPLATE), ChatTemplate(CHATML_TEMPLATE)
    assert a._template is b._template


def test_raise_exception_becomes_a_typed_error():
    source = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('the first message must be the system prompt') }}{% endif %}ok"
    )
    t = ChatTemplate(source)
    assert t.render(MESSAGES) == "ok"
    with pytest.raises(TemplateRaised, match="the first message must be the system prompt"):
        t.render(MESSAGES[1:])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",  # walking to object's subclasses: the classic escape
        "{{ raise_exception.__globals__['os'] }}",
        "{{ messages.append({'role': 'x'}) }}",  # immutable sandbox: inputs cannot be changed
    ],
)
def test_sandbox_violations_are_typed_errors(source):
    with pytest.raises(TemplateUnsafe):
        ChatTemplate(source).render(MESSAGES)


def test_missing_and_broken_templates():
    with pytest.raises(NoChatTemplate, match="/v1/completions"):
        ChatTemplate(None)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(MESSAGES)
