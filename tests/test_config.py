"""The YAML config: sections, defaults, unknown keys and types are errors (exit 2 at the CLI)."""

from __future__ import annotations

import dataclasses

import pytest

from grade.core import config
from grade.core.errors import ConfigError


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
    path = write(tmp_path, "demo:\n  n: 5\n  flag: true\n  inner:\n    a: 2\n    names: [p, q]\n"
                           "  maybe: 0.5\n")
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

    real = {"simulator": "grade.data.simulator:SimulatorConfig",
            "features": "grade.data.features:FeaturesConfig",
            "pretrain": "grade.train.pretrain:PretrainConfig", "finetune": "grade.train.grpo:FinetuneConfig",
            "evaluate": "grade.evaluate.evaluation:EvaluateConfig",
            "promote": "grade.release.promotion:PromoteConfig"}
    for name, target in real.items():
        module, cls = target.split(":")
        assert config.build(getattr(importlib.import_module(module), cls), {}, name) is not None


# ------------------------------------------------------------------------------------------------
# The real sections: declared ranges, shared keys, command-line overrides
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def real_sections(monkeypatch):
    """Undo the ``sections`` fixture: the project's own sections."""
    monkeypatch.setattr(config, "SECTIONS", dict(REAL_SECTIONS))


REAL_SECTIONS = dict(config.SECTIONS)


@pytest.mark.parametrize("text, match", [
    ("pretrain:\n  lr: 0\n", r"pretrain.lr: expected a value > 0, got 0.0"),
    ("pretrain:\n  lr: -1.0e-3\n", r"pretrain.lr: expected a value > 0, got -0.001"),
    ("finetune:\n  lr: 0\n", r"finetune.lr: expected a value > 0"),
    ("pretrain:\n  weight_decay: -0.1\n", r"pretrain.weight_decay: expected a value >= 0, got -0.1"),
    ("pretrain:\n  hidden: [64, -8]\n", r"pretrain.hidden\[1\]: expected a value >= 1, got -8"),
    ("simulator:\n  feature_noise: -0.5\n", r"simulator.feature_noise: expected a value >= 0, got -0.5"),
    ("pretrain:\n  k: -3\n", r"pretrain.k: expected a value >= 1, got -3"),
    ("pretrain:\n  patience: -1\n", r"pretrain.patience: expected a value >= 1, got -1"),
    ("pretrain:\n  sigma: -1\n", r"pretrain.sigma: expected a value > 0, got -1.0"),
    ("pretrain:\n  kappa_min: 500\n  kappa_max: 400\n",
     r"pretrain.kappa_min, kappa_init, kappa_max: expected kappa_min <= kappa_init"),
    ("evaluate:\n  position_bias: -1\n", r"evaluate.position_bias: expected a value >= 0, got -1.0"),
    ("finetune:\n  position_bias: -0.5\n", r"finetune.position_bias: expected a value >= 0"),
    ("simulator:\n  position_bias: -2\n", r"simulator.position_bias: expected a value >= 0"),
    ("finetune:\n  reward:\n    w_max: [0.8, 1.5]\n",
     r"finetune.reward.w_max\[1\]: expected a value in \[0, 1\]"),
    ("features:\n  valid_fraction: 1.0\n", r"features.valid_fraction: expected a value in \[0, 1\), got 1.0"),
    ("promote:\n  guardrails:\n    ctr: -2\n", r"promote.guardrails.ctr: expected a value >= -1"),
    ("pretrain:\n  lr: .nan\n", r"pretrain.lr: expected a value > 0, got nan"),
    ("pretrain: [1, 2]\n", r"pretrain: expected a mapping of keys, got list"),
    ("finetune:\n  reward: [1]\n", r"finetune.reward: expected a mapping of keys, got list"),
])
def test_meaningless_values_are_refused_naming_section_key_value_and_expectation(real_sections, tmp_path,
                                                                                 text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, text))


def test_number_like_strings_are_read_as_numbers(real_sections, tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; float fields parse it."""
    sections = config.load(write(tmp_path, "pretrain:\n  lr: 1e-3\nfinetune:\n  kl_coef: 5e-3\n"))
    assert sections["pretrain"].lr == 1e-3 and sections["finetune"].kl_coef == 5e-3
    with pytest.raises(ConfigError, match="pretrain.lr: expected a number, got 'fast'"):
        config.load(write(tmp_path, "pretrain:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match="pretrain.epochs: expected an integer, got '1e3'"):
        config.load(write(tmp_path, "pretrain:\n  epochs: 1e3\n"))


def _numeric(tp) -> bool:
    import typing

    return tp in (int, float) or any(_numeric(a) for a in typing.get_args(tp))


def test_every_numeric_field_of_every_section_declares_its_range(real_sections):
    import typing

    def visit(cls, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                visit(tp, f"{where}.{f.name}")
            elif _numeric(tp):
                assert "bounds" in f.metadata, f"{where}.{f.name} declares no range"

    for name in config.SECTIONS:
        visit(config.section_class(name), name)


def test_library_entry_checks_configs_made_in_code(real_sections):
    from grade.train.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="pretrain.weight_decay: expected a value >= 0"):
        config.check(PretrainConfig(weight_decay=-1.0))
    assert config.check(PretrainConfig()) == PretrainConfig()


@pytest.mark.parametrize("text, expected", [
    ("", 10),
    ("shared:\n  exposure_depth: 6\n", 6),
    ("pretrain:\n  exposure_depth: 5\n", 5),            # an old per-section key sets it everywhere
    ("finetune:\n  exposure_depth: 4\nevaluate:\n  exposure_depth: 4\n", 4),
    ("shared:\n  exposure_depth: 3\nsimulator:\n  exposure_depth: 3\n", 3),
    ("pretrain:\n  exposure_depth: 2\nevaluate:\nsimulator: null\n", 2),   # empty sections get it too
])
def test_exposure_depth_is_one_shared_value(real_sections, tmp_path, text, expected):
    sections = config.load(write(tmp_path, text))
    depths = {name: sections[name].exposure_depth for name in ("shared", "simulator", "pretrain", "finetune",
                                                                 "evaluate")}
    assert depths == dict.fromkeys(depths, expected)


@pytest.mark.parametrize("text, match", [
    ("pretrain:\n  exposure_depth: 5\nevaluate:\n  exposure_depth: 10\n",
     r"evaluate.exposure_depth: 10 disagrees with pretrain.exposure_depth: 5"),
    ("shared:\n  exposure_depth: 5\nfinetune:\n  exposure_depth: 6\n",
     r"finetune.exposure_depth: 6 disagrees with shared.exposure_depth: 5"),
    ("promote:\n  model_name: a\nevaluate:\n  registry_model_name: b\n",
     r"evaluate.registry_model_name: 'b' disagrees with promote.model_name: 'a'"),
    ("shared:\n  exposure_depth: 0\n", r"shared.exposure_depth: expected a value >= 1, got 0"),
    ("shared:\n  model_name: 'a/b'\n", r"shared.model_name: expected letters"),
])
def test_shared_key_aliases_must_agree(real_sections, tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, text))


def test_model_name_is_shared_by_promote_and_evaluate(real_sections, tmp_path):
    from grade.model.registry import DEFAULT_MODEL

    default = config.load(None)
    assert default["promote"].model_name == default["evaluate"].registry_model_name == DEFAULT_MODEL
    sections = config.load(write(tmp_path, "promote:\n  model_name: shop-mtf\n"))
    assert sections["shared"].model_name == sections["evaluate"].registry_model_name == "shop-mtf"
    # a command-line override of any of its names wins over the file and sets every name
    sections = config.load(write(tmp_path, "shared:\n  model_name: x\n"), {"promote.model_name": "y"})
    assert sections["shared"].model_name == sections["evaluate"].registry_model_name == "y"


def test_set_overrides_on_a_component_command_line(real_sections, tmp_path):
    from components import finetune

    path = write(tmp_path, "finetune:\n  lr: 0.01\n  reward:\n    prior: 0.5\n")
    args = finetune.build_parser().parse_args([
        "--features", "f", "--init", "i", "--out", "o", "--config", path,
        "--set", "finetune.reward.post=0", "--set", "finetune.lr=1e-3",
        "--set", "finetune.adaptive_kappa=false",
        "--set", "pretrain.hidden=[32, 16]", "--set", "shared.exposure_depth=7", "--group-size", "8"])
    sections = config.from_args(args)
    ft = sections["finetune"]
    assert (ft.reward.post, ft.reward.prior, ft.lr) == (0.0, 0.5, 1e-3)
    assert (ft.adaptive_kappa, ft.group_size) == (False, 8)
    assert sections["pretrain"].hidden == [32, 16] and ft.exposure_depth == 7
    # a named flag is applied after --set of the same key
    args = finetune.build_parser().parse_args(["--features", "f", "--init", "i", "--out", "o",
                                               "--set", "finetune.lr=0.5", "--lr", "0.25"])
    assert config.from_args(args)["finetune"].lr == 0.25


@pytest.mark.parametrize("setting, match", [
    ("finetune.lr=-1", r"finetune.lr: expected a value > 0, got -1.0"),
    ("finetune.reward.nope=1", r"finetune.reward: unknown key\(s\) \['nope'\]"),
    ("nowhere.lr=1", r"unknown config section 'nowhere'"),
    ("finetune.epochs=two", r"finetune.epochs: expected an integer, got 'two'"),
    ("finetune.lr.x=1", r"finetune.lr: expected a mapping of keys, got 0.003|finetune.lr: expected a number"),
])
def test_bad_set_values_are_refused_like_yaml_values(real_sections, setting, match):
    from components import finetune

    argv = ["--features", "f", "--init", "i", "--out", "o", "--set", setting]
    args = finetune.build_parser().parse_args(argv)
    with pytest.raises(ConfigError, match=match):
        config.from_args(args)


@pytest.mark.parametrize("module, argv", [
    ("simulate", ["--out", "o"]),
    ("features", ["--logs", "l", "--out", "o"]),
    ("pretrain", ["--features", "f", "--out", "o"]),
    ("finetune", ["--features", "f", "--init", "i", "--out", "o"]),
    ("evaluate", ["--features", "f", "--out", "o"]),
    ("promote", ["--report", "r", "--candidate", "c", "--registry", "g"]),
    ("promote", ["status", "--registry", "g"]),
    ("score", ["--requests", "r", "--out", "o", "--registry", "g"]),
])
def test_every_component_refuses_a_bad_set_with_exit_2(real_sections, capsys, module, argv):
    import importlib

    import grade.core.cli

    main = importlib.import_module(f"components.{module}").main
    assert grade.core.cli.run(main, [*argv, "--set", "pretrain.sigma=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: pretrain.sigma: expected a value > 0, got -1.0"]


def test_flags_mirror_the_dataclass_fields(real_sections):
    from components import finetune, simulate

    text = finetune.build_parser().format_help()
    assert "--reward-post" in text and "lambda_post: coefficient of the posterior" in text
    assert "{dirichlet,gaussian}" in text  # choices of a Literal field
    args = simulate.build_parser().parse_args(["--out", "o", "--requests", "123"])
    assert config.from_args(args)["simulator"].n_requests == 123


def test_bounds_notation():
    b = config.parse_bounds("(0, 1]")
    assert [b.contains(v) for v in (0.0, 0.5, 1.0, 1.5)] == [False, True, True, False]
    assert config.parse_bounds(">= 1").contains(1) and not config.parse_bounds("> 0").contains(0)
    with pytest.raises(ValueError):
        config.parse_bounds("positive")
