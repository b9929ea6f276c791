"""Settings: defaults that work on a laptop, then a YAML file, the environment and flags."""

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
