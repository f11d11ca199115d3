"""Errors asft reports as one clear line (no traceback): each names the field, file or line at fault."""


class ConfigError(ValueError):
    """A wrong configuration value, named by its field, raised before any model is loaded."""


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, reported before any training compute."""
