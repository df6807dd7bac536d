"""Typed run configuration: ``schema`` (the dataclasses and their docs), ``convert`` (values to
types), ``load`` (presets, YAML files, ``inherit``, ``--set`` overrides) and ``validate`` (checks
across keys).

``load_config("tiny-cpu", ["train.steps=50"])`` merges, in order: the dataclass defaults, the
preset (or a YAML file), then the overrides, and checks everything before any cluster work starts.
Every error names the key and the value.
"""

from hierdino.config.load import (
                                  config_diff,
                                  config_from_dict,
                                  list_presets,
                                  load_config,
                                  override_text,
                                  parse_override,
                                  preset_overrides,
)
from hierdino.config.schema import Config, ConfigError
from hierdino.config.validate import validate

__all__ = ["Config", "ConfigError", "config_diff", "config_from_dict", "list_presets", "load_config", "override_text",
           "parse_override", "preset_overrides", "validate"]
