"""The YAML config: sections, defaults, unknown keys and types are errors (exit 2 at the CLI)."""

from __future__ import annotations

import dataclasses

import pytest

from grade import config
from grade.errors import ConfigError


@dataclasses.dataclass
class Inner:
    a: float = 1.0
    """a number"""
    names: list[str] = dataclasses.field(default_factory=lambda: ["x"])
    """a list"""


@dataclasses.dataclass
class Section:
    n: int = 3
    """an integer"""
    flag: bool = False
    """a switch"""
    mode: str = "fast"
    """a string"""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """nested"""
    maybe: float | None = None
    """optional"""


@pytest.fixture(autouse=True)
def sections(monkeypatch):
    monkeypatch.setattr(config, "SECTIONS", {"demo": f"{__name__}:Section", "other": f"{__name__}:Inner"})


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_empty_file_and_no_file_give_defaults(tmp_path):
    assert config.load_section(write(tmp_path, ""), "demo") == Section()
    assert config.load_section(None, "demo") == Section()


def test_values_nested_and_overrides(tmp_path):
    path = write(tmp_path, "demo:\n  n: 5\n  flag: true\n  inner:\n    a: 2\n    names: [p, q]\n  maybe: 0.5\n")
    cfg = config.load_section(path, "demo", {"n": 9, "mode": None})
    assert cfg.n == 9 and cfg.flag is True and cfg.mode == "fast"
    assert cfg.inner == Inner(a=2.0, names=["p", "q"]) and isinstance(cfg.inner.a, float)
    assert cfg.maybe == 0.5
    assert config.to_dict(cfg)["inner"]["names"] == ["p", "q"]


@pytest.mark.parametrize("text, match", [
    ("nonsense:\n  n: 1\n", "unknown config section 'nonsense'"),
    ("demo:\n  m: 1\n", r"unknown key\(s\) \['m'\]"),
    ("demo:\n  inner:\n    b: 1\n", r"demo.inner: unknown key"),
    ("demo:\n  n: 1.5\n", "demo.n: expected an integer"),
    ("demo:\n  flag: 1\n", "demo.flag: expected true/false"),
    ("demo:\n  inner:\n    names: p\n", "demo.inner.names: expected a list"),
    ("other:\n  a: text\n", "other.a: expected a number"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("demo: [1\n", "not valid YAML"),
])
def test_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load_section(write(tmp_path, text), "demo")


def test_every_section_is_validated_not_only_the_one_loaded(tmp_path):
    with pytest.raises(ConfigError, match="other"):
        config.load_section(write(tmp_path, "other:\n  zzz: 1\n"), "demo")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load_section(str(tmp_path / "nope.yaml"), "demo")


def test_real_sections_all_load_with_defaults():
    """Every step's section class exists and builds from an empty mapping."""
    import importlib

    real = {"simulator": "grade.simulator:SimulatorConfig", "features": "grade.features:FeaturesConfig",
            "pretrain": "grade.pretrain:PretrainConfig", "finetune": "grade.grpo:FinetuneConfig",
            "evaluate": "grade.evaluation:EvaluateConfig", "promote": "grade.promotion:PromoteConfig"}
    for name, target in real.items():
        module, cls = target.split(":")
        assert config.build(getattr(importlib.import_module(module), cls), {}, name) is not None
