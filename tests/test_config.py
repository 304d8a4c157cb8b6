"""The YAML config: sections, defaults, unknown keys and types are errors (exit 2 at the CLI)."""

from __future__ import annotations

import dataclasses

import pytest

from grade.core import config
from grade.core.errors import ConfigError, InputError


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


def use_sections(monkeypatch, sections: dict[str, str]) -> None:
    """Replace the section table's entries in place (every config module holds the same dict)."""
    for name in list(config.SECTIONS):
        monkeypatch.delitem(config.SECTIONS, name)
    for name, target in sections.items():
        monkeypatch.setitem(config.SECTIONS, name, target)


@pytest.fixture(autouse=True)
def sections(monkeypatch):
    use_sections(monkeypatch, {"demo": f"{__name__}:Section", "other": f"{__name__}:Inner"})


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
    use_sections(monkeypatch, REAL_SECTIONS)


REAL_SECTIONS = dict(config.SECTIONS)


@pytest.mark.parametrize("text, match", [
    ("pretrain:\n  lr: 0\n", r"pretrain.lr: expected a value > 0, got 0.0"),
    ("pretrain:\n  lr: -1.0e-3\n", r"pretrain.lr: expected a value > 0, got -0.001"),
    ("finetune:\n  lr: 0\n", r"finetune.lr: expected a value > 0"),
    ("pretrain:\n  weight_decay: -0.1\n", r"pretrain.weight_decay: expected a value >= 0, got -0.1"),
    ("pretrain:\n  hidden: [64, -8]\n", r"pretrain.hidden\[1\]: expected a value in \[1, 8192\], got -8"),
    ("simulator:\n  feature_noise: -0.5\n", r"simulator.feature_noise: expected a value >= 0, got -0.5"),
    ("pretrain:\n  k: -3\n", r"pretrain.k: expected a value in \[1, 10000\], got -3"),
    ("pretrain:\n  patience: -1\n", r"pretrain.patience: expected a value in \[1, 10000\], got -1"),
    ("pretrain:\n  sigma: -1\n", r"pretrain.sigma: expected a value > 0, got -1.0"),  # retired, checked
    ("finetune:\n  kappa_min: 500\n  kappa_max: 400\n",
     r"finetune.kappa_min, kappa_init, kappa_max: expected kappa_min <= kappa_init"),
    ("pretrain:\n  kappa_min: 500\n  kappa_max: 400\n",       # the old names of the same keys
     r"finetune.kappa_min, kappa_init, kappa_max: expected kappa_min <= kappa_init"),
    ("shared:\n  eta: -1\n", r"shared.eta: expected a value in \[0, 10\], got -1.0"),
    ("evaluate:\n  position_bias: -1\n", r"evaluate.position_bias: expected a value in \[0, 10\], got -1.0"),
    ("simulator:\n  position_bias: -2\n", r"simulator.position_bias: expected a value in \[0, 10\]"),
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
    ("outcome:\n  fixed_eta: 0.8\nevaluate:\n  position_bias: 1.0\n",
     r"evaluate.position_bias: 1.0 disagrees with outcome.fixed_eta: 0.8 \(one value, shared.eta"),
    ("shared:\n  exposure_depth: 0\n", r"shared.exposure_depth: expected a value in \[1, 1000\], got 0"),
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
        "--set", "ablation.adaptive_kappa=false",
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
    ("finetune.lr.x=1", r"finetune.lr: expected a mapping of keys, got a value \(so finetune.lr.x is no "),
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
    assert grade.core.cli.run(main, [*argv, "--set", "pretrain.lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: pretrain.lr: expected a value > 0, got -1.0"]


def test_flags_mirror_the_dataclass_fields(real_sections):
    from components import finetune, simulate

    text = finetune.build_parser().format_help()
    assert "--reward-post" in text and "lambda_post: coefficient of the posterior" in text
    assert "--seed" in text and "(shared.seed)" in text
    assert "{dirichlet,gaussian}" in text  # choices of a Literal field
    args = simulate.build_parser().parse_args(["--out", "o", "--requests", "123"])
    assert config.from_args(args)["simulator"].n_requests == 123


def test_bounds_notation():
    b = config.parse_bounds("(0, 1]")
    assert [b.contains(v) for v in (0.0, 0.5, 1.0, 1.5)] == [False, True, True, False]
    assert config.parse_bounds(">= 1").contains(1) and not config.parse_bounds("> 0").contains(0)
    with pytest.raises(ValueError):
        config.parse_bounds("positive")


# ------------------------------------------------------------------------------------------------
# The diet: keys, old names, ablation presets, the documented defaults
# ------------------------------------------------------------------------------------------------

def _keys(cls, where):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not config.is_key(f):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{where}.{f.name}")
        else:
            yield f"{where}.{f.name}"


def test_at_most_122_keys_one_seed_one_depth_one_eta(real_sections):
    keys = [k for name in config.SECTIONS for k in _keys(config.section_class(name), name)]
    assert len(keys) <= 122, len(keys)  # 122: evaluate.interval (issue 23)
    leaf = [k.rsplit(".", 1)[1] for k in keys]
    # the simulated world's seed and eta are the data's (simulator.seed, simulator.position_bias)
    assert [k for k in keys if leaf[keys.index(k)] == "seed"] == ["shared.seed", "simulator.seed"]
    assert [k for k in keys if "exposure_depth" in k] == ["shared.exposure_depth"]
    assert [k for k in keys if k.endswith((".eta", "position_bias", "fixed_eta"))] == \
        ["shared.eta", "simulator.position_bias"]


def test_every_key_has_a_doc_line(real_sections):
    import typing

    def visit(cls, where):
        docs, hints = config.field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{where}.{f.name} has no doc line"
            if dataclasses.is_dataclass(hints[f.name]):
                visit(hints[f.name], f"{where}.{f.name}")

    for name in config.SECTIONS:
        visit(config.section_class(name), name)


#: old name -> (section, attribute path, value given, the new key it sets)
OLD_NAMES = {
    "pretrain.seed": ("pretrain", "seed", 3, "ablation.seeds"),
    "finetune.seed": ("finetune", "seed", 4, "ablation.seeds"),
    "evaluate.seed": ("evaluate", "seed", 5, "ablation.seeds"),
    "outcome.model.seed": ("value_model", "outcome.seed", 6, "ablation.seeds"),
    "outcome.examination.seed": ("value_model", "examination.seed", 7, "ablation.seeds"),
    "outcome.model.epochs": ("value_model", "outcome.epochs", 2, "value_model.outcome.epochs"),
    "outcome.fixed_eta": ("evaluate", "position_bias", 0.8, "shared.eta"),
    "finetune.position_bias": ("evaluate", "position_bias", 0.7, "shared.eta"),
    "finetune.reward.post_debias_eta": ("finetune", "position_bias", 0.6, "shared.eta"),
    "finetune.exploration": ("finetune", "exploration", "gaussian", "ablation.exploration"),
    "finetune.adaptive_kappa": ("finetune", "adaptive_kappa", False, "ablation.adaptive_kappa"),
    "finetune.reward.guard_mode": ("finetune", "reward.guard_mode", "price", "ablation.guard_mode"),
    "finetune.reward.guard_clicks": ("finetune", "reward.guard_clicks", 0.0, "ablation.guard_prices"),
    "pretrain.kappa_init": ("finetune", "kappa_init", 60.0, "finetune.kappa_init"),
    "finetune.advantage_norm": ("finetune", "advantage_norm", "group", None),      # retired: still applies
    "finetune.reward.post_normalise": ("finetune", "reward.post_normalise", "request", None),
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_names_still_work_and_warn_once(real_sections, tmp_path, monkeypatch, caplog, old):
    import logging

    section, attr, value, new = OLD_NAMES[old]
    config._WARNED.clear()  # one warning per name per process: forget the earlier tests' names
    path = write(tmp_path, "")
    caplog.set_level(logging.WARNING, logger="grade.core.config")
    for _ in range(3):   # one warning per key per process
        cfg = config.load(path, {old: value})[section]
        for part in attr.split("."):
            cfg = getattr(cfg, part)
        assert cfg == value
    warned = [r.getMessage() for r in caplog.records if old in r.getMessage()]
    assert len(warned) == 1 and (new is None or new in warned[0]), warned


def test_the_old_demo_config_and_its_new_form_give_the_same_sections(real_sections, tmp_path):
    old = write(tmp_path, "simulator:\n  seed: 7\npretrain:\n  seed: 0\n  exposure_depth: 10\n"
                          "  kappa_max: 300\nfinetune:\n  seed: 0\n  position_bias: 0.9\n  fixed_kappa: 150\n"
                          "outcome:\n  fixed_eta: 0.9\n  model:\n    members: 2\n")
    (tmp_path / "new.yaml").write_text("simulator:\n  seed: 7\nfinetune:\n  kappa_max: 300\n"
                                       "shared:\n  eta: 0.9\n  eta_mode: fixed\n"
                                       "value_model:\n  outcome:\n    members: 2\n")
    old_sections, new_sections = config.load(old), config.load(str(tmp_path / "new.yaml"))
    assert old_sections.pop("ablation").seeds == {"pretrain": 0, "finetune": 0}   # as before: one step each
    assert old_sections == {k: v for k, v in new_sections.items() if k != "ablation"}
    assert config.load(old)["pretrain"].kappa_max == 300 and config.load(old)["value_model"].fixed_eta == 0.9


def test_one_seed_for_every_step_and_ablation_seeds_set_one_apart(real_sections):
    sections = config.load(None, {"shared.seed": 11, "ablation.seeds": {"outcome": 12}})
    seeds = [sections["pretrain"].seed, sections["finetune"].seed, sections["evaluate"].seed,
             sections["value_model"].examination.seed, sections["value_model"].outcome.seed]
    assert seeds == [11, 11, 11, 11, 12] and sections["simulator"].seed == 0


def test_eta_mode_fixed_is_the_value_models_fixed_eta(real_sections):
    assert config.load(None, {"shared.eta": 0.7})["value_model"].fixed_eta == 0.0      # estimated
    sections = config.load(None, {"shared.eta": 0.7, "shared.eta_mode": "fixed"})
    assert sections["value_model"].fixed_eta == 0.7 == sections["evaluate"].position_bias
    assert sections["simulator"].position_bias == 1.0                                   # the world's own


@pytest.mark.parametrize("preset", [*sorted(config.ABLATION_PRESETS), "grade_ips", "grade_dcg_ips"])
def test_every_ablation_preset_sets_its_keys_over_the_file(real_sections, tmp_path, preset):
    """The pipeline's ablations are presets; one --set reproduces a row of the documented table."""
    path = write(tmp_path, "finetune:\n  reward:\n    post: 0.5\n    prior: 0.5\n    post_estimator: dm\n"
                           "ablation:\n  exploration: dirichlet\n")
    sections = config.load(path, {"ablation.preset": preset})
    for dotted, value in config.preset_keys(preset).items():
        node = sections
        for part in dotted.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value, dotted
    derived = {"grade_gaussian": ("exploration", "gaussian"), "grade_fixed_kappa": ("adaptive_kappa", False)}
    if preset in derived:
        assert getattr(sections["finetune"], derived[preset][0]) == derived[preset][1]
    if preset == "grade_guard_prices":
        assert sections["finetune"].reward.guard_mode == "price"
    # a command-line --set of a key the preset sets still wins
    key, value = next(iter(config.preset_keys(preset).items()))
    other = {str: "dirichlet" if "exploration" in key else "constraint" if "guard" in key else "ips",
             bool: True, float: 0.25}[type(value)]
    over = config.load(path, {"ablation.preset": preset, key: other})
    node = over
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert node == other


def test_pipeline_ablations_are_the_presets(real_sections):
    from pipeline import params

    assert list(params.ABLATIONS)[:len(config.ABLATION_PRESETS)] == list(config.ABLATION_PRESETS)
    assert all(config.preset_keys(v["ablation"]["preset"]) for v in params.ABLATIONS.values())
    with pytest.raises(ConfigError, match="ablation.preset: expected '', one of"):
        config.load(None, {"ablation.preset": "nothing"})
    with pytest.raises(InputError, match="finetune.reward.post_estimator: expected one of"):
        config.load(None, {"ablation.preset": "grade_nothing"})  # the registry names the estimators


# ------------------------------------------------------------------------------------------------
# Limits: YAML aliases, file size, long integers, upper bounds of size-like keys, the prior flavour
# ------------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "pretrain:\n  hidden: *i\n"


@pytest.mark.parametrize("module, argv", [
    ("pretrain", ["--features", "f", "--out", "o"]),
    ("config", []),
])
def test_a_yaml_alias_bomb_is_refused_at_once_with_exit_2(real_sections, tmp_path, capsys, module, argv):
    import importlib
    import time

    import grade.core.cli

    path = write(tmp_path, BOMB)
    main = importlib.import_module(f"components.{module}").main
    start = time.perf_counter()
    extra = ["--check", path] if module == "config" else ["--config", path]
    assert grade.core.cli.run(main, [*argv, *extra]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "anchors and aliases" in err[0] and path in err[0] and len(err[0]) < 300


def test_a_huge_config_file_is_refused(real_sections, tmp_path):
    path = write(tmp_path, "# " + "x" * (config.MAX_CONFIG_BYTES + 10) + "\n")
    with pytest.raises(ConfigError, match="a config holds at most"):
        config.load(path)


@pytest.mark.parametrize("text, match", [
    ("pretrain:\n  hidden: [1e8, 1e8]\n", r"pretrain.hidden\[0\]: expected an integer, got '1e8'"),
    ("pretrain:\n  hidden: [100000000, 1]\n", r"pretrain.hidden\[0\]: expected a value in \[1, 8192\]"),
    ("finetune:\n  group_size: 100000000\n", r"finetune.group_size: expected a value in \[2, 4096\]"),
    ("pretrain:\n  epochs: " + "9" * 5000 + "\n", r"pretrain.epochs: expected a number of at most 30 digits, "
                                                  r"got a number of 5000 digits"),
    ("finetune:\n  lr: " + "9" * 5000 + "\n", r"finetune.lr: expected a number of at most 30 digits"),
    ("simulator:\n  n_requests: 10000000000\n", r"simulator.n_requests: expected a value in \[1, 1e8\]"),
    ("shared:\n  seed: 99999999999999999999\n", r"shared.seed: expected a value in \[0, "),
    ("promote:\n  primary_flavour: prior\n", r"promote.primary_flavour: 'prior' is not accepted"),
])
def test_size_like_values_have_upper_bounds(real_sections, tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, text))


def test_long_numbers_on_the_command_line_are_refused_naming_the_key(real_sections, capsys):
    import grade.core.cli
    from components import finetune

    argv = ["--features", "f", "--init", "i", "--out", "o", "--set", "finetune.group_size=" + "7" * 5000]
    assert grade.core.cli.run(finetune.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: finetune.group_size: expected a number of at most 30 digits, got a number of 5000 "
                   "digits")


def test_every_size_like_integer_key_has_an_upper_bound(real_sections):
    import typing

    def visit(cls, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                visit(tp, f"{where}.{f.name}")
            elif int in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in
                                                     typing.get_args(t))):
                assert f.metadata["bounds"].high < float("inf"), f"{where}.{f.name} has no upper bound"

    for name in config.SECTIONS:
        visit(config.section_class(name), name)


# ------------------------------------------------------------------------------------------------
# python -m components.config; every config of the project and its docs loads
# ------------------------------------------------------------------------------------------------

def test_printed_defaults_are_documented_yaml_that_loads_to_the_defaults(real_sections, tmp_path, capsys):
    from components import config as component

    assert component.main([]) == 0
    text = capsys.readouterr().out
    assert "# random seed of every step run on the data" in text and "\nablation:\n" in text
    path = write(tmp_path, text)
    assert config.load(path) == config.load(None)
    assert text.count(":\n") + sum(1 for line in text.splitlines() if ": " in line and not
                                   line.lstrip().startswith("#")) >= 110


def test_check_exits_2_naming_the_key(real_sections, tmp_path, capsys):
    import grade.core.cli
    from components import config as component

    bad = write(tmp_path, "finetune:\n  reward:\n    pst: 1\n")
    assert grade.core.cli.run(component.main, ["--check", bad]) == 2
    assert capsys.readouterr().err.startswith("error: finetune.reward: unknown key(s) ['pst']")
    old = write(tmp_path, "pretrain:\n  seed: 1\n")
    assert grade.core.cli.run(component.main, ["--check", old]) == 0
    assert grade.core.cli.run(component.main, ["--check", old, "--strict"]) == 2


def _doc_snippets():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted([root / "README.md", *(root / "docs").glob("*.md")]):
        text = path.read_text()
        for block in re.findall(r"```ya?ml\n(.*?)```", text, re.S):
            yield path.name, "yaml", block
        # a concrete value, not =<placeholder>
        for setting in re.findall(r"--set ([a-z_]+\.[a-z_.]+=[^\s`\\<][^\s`\\]*)", text):
            yield path.name, "set", setting


def test_every_config_and_doc_snippet_passes_check(real_sections, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for cfg in sorted((root / "configs").glob("*.yaml")):
        config.load(str(cfg))
    seen = 0
    for name, kind, snippet in _doc_snippets():
        try:
            if kind == "yaml":
                config.load(write(tmp_path, snippet))
            else:
                config.load(None, dict([config.parse_setting(snippet)]))
        except ConfigError as e:
            raise AssertionError(f"{name}: {snippet!r}: {e}") from None
        seen += 1
    assert seen >= 3
