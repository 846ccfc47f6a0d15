"""NeoX yml in, typed and validated config sections out (see loader.py and schema.py)."""

from .loader import (
    ConfigError,
    NeoXConfig,
    build_config,
    config_from_checkpoint_dict,
    load_config,
    parse_override,
    resolve_layers,
)
from .schema import DEFAULT_SEED, SECTIONS

__all__ = [
    "ConfigError",
    "DEFAULT_SEED",
    "NeoXConfig",
    "SECTIONS",
    "build_config",
    "config_from_checkpoint_dict",
    "load_config",
    "parse_override",
    "resolve_layers",
]
