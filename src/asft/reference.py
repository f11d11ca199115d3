"""Deprecated: `asft.reference` moved to `asft.training.reference`; this alias will be removed in the next release."""

import warnings

from .training import reference as _moved

globals().update({k: v for k, v in vars(_moved).items() if not k.startswith("__")})
warnings.warn("asft.reference is deprecated: import from asft.training.reference", DeprecationWarning, stacklevel=2)
