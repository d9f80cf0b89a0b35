"""A GGUF's chat template is untrusted code: it renders in a sandbox bounded in time and size,
and anything hostile ends in InvalidGGUF with the reason, never a hang or a crash."""

from __future__ import annotations

import time

import pytest

from localmix.chat import sandbox
from localmix.errors import InvalidGGUF

MESSAGES = {"messages": [{"role": "user", "content": "hi"}], "bos_token": "<s>"}

HOSTILE = [
    (
        "nested range loops",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "more than",
    ),
    (
        "nested loops writing",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "more than",
    ),
    ("a huge string by *", "{{ 'a' * 200000000 }}", "more than"),
    ("a huge list by *", "{{ [1] * 10**9 }}", "more than|power"),
    (
        "a string doubled by ~",
        "{% set s = namespace(v='ab') %}{% for i in range(64) %}"
        "{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        "more than",
    ),
    (
        "a string doubled by +",
        "{% set s = namespace(v='ab') %}{% for i in range(64) %}"
        "{% set s.v = s.v + s.v %}{% endfor %}{{ s.v }}",
        "more than",
    ),
    ("a big power", "{{ 10 ** 100000000 }}", "power"),
    ("overflowing range", "{{ range(10**30) | list }}", "range|failed"),
    ("include", "{% include 'secrets.txt' %}", "secrets.txt"),
    ("import", "{% import '/etc/passwd' as p %}", "passwd"),
    ("extends", "{% extends 'base.html' %}", "base.html"),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses|failed"),
    ("a python attribute", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe|failed"),
    ("raise_exception", "{{ raise_exception('only user and assistant') }}", "only user"),
    ("division by zero", "{{ 1 / 0 }}", "ZeroDivisionError"),
    ("a 100 MB prompt", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "more than"),
]


@pytest.mark.parametrize(
    ("template", "needle"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_a_hostile_template_is_stopped_with_a_reason(template: str, needle: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidGGUF, match=needle) as caught:
        sandbox.render(template, MESSAGES)
    # each would run for hours or exhaust memory unbounded; the margin is for a loaded CI machine,
    # this is no timing measurement
    assert time.monotonic() - started < sandbox.SECONDS + 30
    assert caught.value.hint and "--format" in caught.value.hint


def test_a_real_template_renders_as_before() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
    )
    assert sandbox.render(template, MESSAGES) == "<s>[INST] hi [/INST]"


def test_the_budget_does_not_leak_a_tracer() -> None:
    import sys

    before = sys.gettrace()
    with pytest.raises(InvalidGGUF):
        sandbox.render("{{ 'a' * 10**9 }}", MESSAGES)
    assert sys.gettrace() is before
