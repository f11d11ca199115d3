"""Deprecated: `asft.trainer` moved to `asft.training.trainer`; this alias will be removed in the next release."""

import warnings

from .training import trainer as _moved

globals().update({k: v for k, v in vars(_moved).items() if not k.startswith("__")})
warnings.warn("asft.trainer is deprecated: import from asft.training.trainer", DeprecationWarning, stacklevel=2)
