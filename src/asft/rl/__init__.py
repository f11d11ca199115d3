"""`asft rl`: GRPO / DAPO / Dr.GRPO from an asft run (or a base model, or a LoRA adapter) with verifiable rewards.

The RL itself is TRL's GRPOTrainer: generation, group advantages, the clipped policy loss, the KL term to the
reference and its loss aggregations. This module adds what TRL leaves to the user: the problem files `asft eval`
reads, rendered with the same prompt templates; the rewards of `asft.rl.rewards`; the algorithm presets; DAPO's
dynamic sampling (TRL has none; see `AsftGRPOTrainer._drop_flat_groups`); and the run safety of `asft train`
(metrics.jsonl, SIGTERM -> checkpoint, resume, an error on a non-finite loss).

Which parts of DAPO are whose:
  token-level loss       TRL  loss_type=dapo (normalised by the active tokens of the whole accumulated batch)
  clip-higher            TRL  epsilon_high (0.28 by default here, as the DAPO paper)
  overlong punishment    TRL  trl.rewards.get_soft_overlong_punishment, added as a reward (--overlong_buffer)
  dynamic sampling       ours groups whose correctness rewards are all equal are masked out of the loss (not
                              refilled by over-sampling as in the paper: the step's batch shrinks instead)

Layout: `args` (settings and presets), `start` (problems and the starting model), `trainer` (the GRPOTrainer
subclass), `rewards` (math / choice / format / your own, each guarded); the command is `asft.cli.rl`.
"""

from __future__ import annotations

from .args import ALGORITHMS, RLArguments

__all__ = ["ALGORITHMS", "AsftGRPOTrainer", "RLArguments", "build_trainer"]


def __getattr__(name):
    # `import asft.rl` stays light: the trainer pulls in TRL's GRPOTrainer.
    if name in ("AsftGRPOTrainer", "build_trainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'asft.rl' has no attribute {name!r}")
