"""Deprecated: `asft.config` moved to `asft.training.config`; this alias will be removed in the next release."""

import warnings

from .training import config as _moved

globals().update({k: v for k, v in vars(_moved).items() if not k.startswith("__")})
warnings.warn("asft.config is deprecated: import from asft.training.config", DeprecationWarning, stacklevel=2)
