"""Config schema (``base_config``) and validation."""

from qtrain.config.base import base_config
from qtrain.config.validate import ConfigError, check_override, validate
