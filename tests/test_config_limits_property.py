"""The config reader's limits as properties: any alias is refused (an alias bomb cannot expand), any
integer longer than the limit stays text and is refused naming its key, any text over the size limit
is refused before it is parsed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grade.core import config

NAME = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(levels=st.integers(1, 12), fan_out=st.integers(1, 9), name=NAME)
def test_a_config_with_an_alias_is_refused_however_deep_it_would_expand(levels, fan_out, name):
    lines = [f"l0: &l0 [{name}]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]")
    with pytest.raises(config.ConfigError, match="c.yaml"):
        config.safe_load("\n".join(lines), "c.yaml")


@settings(max_examples=50, deadline=None)
@given(digits=st.integers(config.MAX_DIGITS + 1, 5000), sign=st.sampled_from(["", "-", "+"]))
def test_an_integer_over_the_digit_limit_stays_text_and_is_refused_naming_its_key(digits, sign):
    doc = config.safe_load(f"finetune:\n  group_size: {sign}{'7' * digits}\n", "c.yaml")
    value = doc["finetune"]["group_size"]
    assert isinstance(value, config.LongNumber)
    with pytest.raises(config.ConfigError, match=r"finetune\.group_size"):
        config.build(config.section_class("finetune"), doc["finetune"], "finetune")


@settings(max_examples=20, deadline=None)
@given(extra=st.integers(1, 4096))
def test_a_text_over_the_size_limit_is_refused_before_parsing(extra):
    text = "#" * (config.MAX_CONFIG_BYTES + extra)
    with pytest.raises(config.ConfigError, match="at most"):
        config.safe_load(text, "c.yaml")
