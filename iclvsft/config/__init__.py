"""Configs: the schema of typed, frozen sections (:mod:`.schema`) and how a config is loaded, checked and
varied (:mod:`.load`). ``load_config`` returns a :class:`Config`; ``derive`` makes a checked variant."""
from .load import OPEN, build, check_section, derive, load_config, merge, nest, parse_override, protocol_ft, schema_field
from .schema import (
    ALL_TASKS,
    ATTN_IMPLEMENTATIONS,
    BATCHING,
    CIRCUIT_CONDITIONS,
    CIRCUIT_METHODS,
    CORRUPTIONS,
    DEFAULTS,
    DEMO_MODES,
    DTYPES,
    FT_METHODS,
    FT_ROWS,
    LADDER_SELECT,
    LOGITS_ON,
    LOSS_ON,
    LR_SCHEDULERS,
    CircuitsConfig,
    Config,
    DataConfig,
    EvalConfig,
    FtConfig,
    LadderConfig,
    LoraConfig,
    ReproduceConfig,
    Section,
)

__all__ = [
    "ALL_TASKS", "ATTN_IMPLEMENTATIONS", "BATCHING", "CIRCUIT_CONDITIONS", "CIRCUIT_METHODS", "CORRUPTIONS", "DEFAULTS",
    "DEMO_MODES", "DTYPES", "FT_METHODS", "FT_ROWS", "LADDER_SELECT", "LOGITS_ON", "LOSS_ON",
    "LR_SCHEDULERS", "OPEN", "CircuitsConfig", "Config", "DataConfig", "EvalConfig", "FtConfig", "LadderConfig",
    "LoraConfig", "ReproduceConfig", "Section", "build", "check_section", "derive", "load_config", "merge", "nest",
    "parse_override", "protocol_ft", "schema_field",
]
