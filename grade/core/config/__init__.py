"""One YAML config, a section per step; every key has a default, unknown keys are errors.

Each step defines its section as a dataclass in its own module (one line of doc per field);
this module maps section names to those classes, loads YAML, applies command-line overrides and
builds typed, validated configs: the one place where configuration is checked. Numeric fields
declare their range with :func:`ranged` (size-like ones an upper bound too); :func:`build` checks
every key's type and range (nested dataclasses included) and then calls the class's ``validate()``
hook, if any, for checks that need more than one field.

Not every dataclass field is a key (docs/pipeline.md, "Configuration"):

* a **derived** field (``ranged(..., derived=SOURCE)`` / ``setting(..., derived=SOURCE)``) takes the
  value of another key, e.g. every step's ``seed`` is ``shared.seed``; the step's own old name is
  an alias of that key;
* a **retired** field keeps its default as a constant; an old file that sets it still works;
* ``outcome`` is the old name of the ``value_model`` section (``outcome.model``: ``value_model.outcome``).

Every old name is accepted for one release and logs one warning per name per process."""

from grade.core.config.fields import (  # noqa: F401
    DEFAULT_MODEL,
    MAX_DIGITS,
    SECTIONS,
    Bounds,
    LongNumber,
    T,
    build,
    check,
    is_key,
    keys,
    parse_bounds,
    ranged,
    section_class,
    section_name,
    setting,
    show,
)
from grade.core.config.flags import (  # noqa: F401
    add_arguments,
    defaults_yaml,
    field_docs,
    from_args,
    old_names_used,
    parse_bool,
    parse_setting,
    parse_value,
)
from grade.core.config.keys import (  # noqa: F401
    _WARNED,
    SECTION_RENAMES,
)
from grade.core.config.loading import (  # noqa: F401
    MAX_CONFIG_BYTES,
    load,
    load_section,
    load_yaml,
    safe_load,
    to_dict,
)
from grade.core.config.shared import (  # noqa: F401
    ABLATION_PRESETS,
    DERIVED,
    ESTIMATOR_PRESET,
    MAX_SEED,
    SEED_RANGE,
    SEED_STEPS,
    AblationConfig,
    SharedConfig,
    preset_keys,
)
from grade.core.errors import ConfigError  # noqa: F401  (callers catch config.ConfigError)
