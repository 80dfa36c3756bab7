"""The ground floor of xdt: what a config file may say, and reading it.

This package imports nothing else of xdt (tests/test_layers.py checks it in a fresh
interpreter), and no torch: every other module builds on it.
- `schema`: the experiment's sections (pydantic models), their defaults and descriptions;
- `transforms`: the arguments of each image transform op (the ops are in data/transforms.py);
- `loading`: YAML (safe, bounded), `base:` chains, `key.path=value` overrides, the schema check;
- `errors`: `XdtError`, `ConfigError`, did-you-mean, first lines, pydantic errors as one line each.
What a config means for a subcommand (its method, data sets, selection rule) is resolved one
floor up, in xdt_cli/resolve.py (`load_config`).
"""

from xdt_cli.config.errors import (
    ConfigError,
    XdtError,
    did_you_mean,
    error_lines,
    first_line,
)
from xdt_cli.config.loading import (
    MAX_YAML_NODES,
    apply_overrides,
    deep_merge,
    parse_experiment,
    parse_override,
    read_config,
    read_with_bases,
    read_yaml,
)
from xdt_cli.config.schema import (
    SUBCOMMANDS,
    TASK_KEYS,
    AdamConfig,
    AdamWConfig,
    ConstantSchedule,
    CosineSchedule,
    DataConfig,
    DomainConfig,
    DomainFilesConfig,
    ExperimentConfig,
    InitConfig,
    InvSchedule,
    LoaderConfig,
    MethodSection,
    ModelConfig,
    OneCycleSchedule,
    OptimConfig,
    ScheduleConfig,
    SelectionConfig,
    SGDConfig,
    StepSchedule,
    TaskConfig,
    TrainConfig,
    dump_config,
    flatten,
)
from xdt_cli.config.strict import (
    Strict,
)
from xdt_cli.config.transforms import (
    NORMALIZE_PRESETS,
    CenterCropArgs,
    ColorJitterArgs,
    GrayscaleArgs,
    HorizontalFlipArgs,
    LevelsArgs,
    NormalizeArgs,
    RandomAffineArgs,
    RandomCropArgs,
    RandomResizedCropArgs,
    ResizeArgs,
    TransformsConfig,
    TransformStep,
)

__all__ = [
    "AdamConfig",
    "AdamWConfig",
    "CenterCropArgs",
    "ColorJitterArgs",
    "ConfigError",
    "ConstantSchedule",
    "CosineSchedule",
    "DataConfig",
    "DomainConfig",
    "DomainFilesConfig",
    "ExperimentConfig",
    "GrayscaleArgs",
    "HorizontalFlipArgs",
    "InitConfig",
    "InvSchedule",
    "LevelsArgs",
    "LoaderConfig",
    "MAX_YAML_NODES",
    "MethodSection",
    "ModelConfig",
    "NORMALIZE_PRESETS",
    "NormalizeArgs",
    "OneCycleSchedule",
    "OptimConfig",
    "RandomAffineArgs",
    "RandomCropArgs",
    "RandomResizedCropArgs",
    "ResizeArgs",
    "SGDConfig",
    "SUBCOMMANDS",
    "ScheduleConfig",
    "SelectionConfig",
    "StepSchedule",
    "Strict",
    "TASK_KEYS",
    "TaskConfig",
    "TrainConfig",
    "TransformStep",
    "TransformsConfig",
    "XdtError",
    "apply_overrides",
    "deep_merge",
    "did_you_mean",
    "dump_config",
    "error_lines",
    "first_line",
    "flatten",
    "parse_experiment",
    "parse_override",
    "read_config",
    "read_with_bases",
    "read_yaml",
]
