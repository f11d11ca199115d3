"""asft: Anchored Supervised Fine-Tuning (ASFT) and its baselines for causal language models."""

from .version import __version__

__all__ = ["AnchoredSFTConfig", "AnchoredSFTTrainer", "__version__"]


def __getattr__(name):
    # Keep `import asft` light: the trainer pulls in TRL and transformers.
    if name == "AnchoredSFTConfig":
        from .training.config import AnchoredSFTConfig

        return AnchoredSFTConfig
    if name == "AnchoredSFTTrainer":
        from .training.trainer import AnchoredSFTTrainer

        return AnchoredSFTTrainer
    raise AttributeError(f"module 'asft' has no attribute {name!r}")
