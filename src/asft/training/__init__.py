"""Training: the config (TRL-style dataclass), the trainer (overrides only what differs from TRL's SFTTrainer),
its callbacks, checkpoints and resume, and where the reference distribution comes from."""

from __future__ import annotations

from .config import AnchoredSFTConfig

__all__ = ["AnchoredSFTConfig", "AnchoredSFTTrainer"]


def __getattr__(name):
    if name == "AnchoredSFTTrainer":
        from .trainer import AnchoredSFTTrainer

        return AnchoredSFTTrainer
    raise AttributeError(f"module 'asft.training' has no attribute {name!r}")
