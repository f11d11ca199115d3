"""The GRPO trainer: TRL's GRPOTrainer with asft's run safety, evaluation-identical prompt tokens, DAPO's dynamic
sampling and a KL monitor; its rewards and weights."""

from __future__ import annotations

import math

import torch
from trl import GRPOTrainer

from ..data.templates import encode_prompt
from ..errors import TrainingDivergedError, UsageError
from ..training.callbacks import GracefulStopCallback, MetricsFileCallback, RunTotalsCallback, read_totals
from ..training.checkpoints import last_checkpoint
from .args import RLArguments, dynamic_sampling_on, overlong_buffer
from .rewards import build_rewards

# The private GRPOTrainer methods and attributes AsftGRPOTrainer overrides or uses (trl 1.16.0).
TRL_PRIVATE_NAMES = (
    "_tokenize_prompts",
    "_calculate_rewards",
    "_generate_and_score_completions",
    "_get_per_token_logps_and_entropies",
)


class AsftGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with asft's run safety, evaluation-identical prompt tokens and DAPO's dynamic sampling.

    It also calls (does not override) TRL's private `_get_per_token_logps_and_entropies` and `_metrics` (read from
    trl 1.16.0). Every private name it relies on is listed in TRL_PRIVATE_NAMES; a test fails, naming the method,
    when a TRL upgrade removes one.
    """

    def __init__(
        self, *args, dynamic_sampling: bool = False, signal_column: int | None = 0, monitor_kl: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.dynamic_sampling = dynamic_sampling
        self.monitor_kl = monitor_kl and self.beta == 0.0  # with beta > 0 TRL logs `kl` itself
        self._monitor_ref = None
        if self.monitor_kl:
            self._setup_kl_monitor(new_adapter=kwargs.get("peft_config") is not None)
        self.signal_column = signal_column  # the correctness reward: what "no signal" is judged by
        self._gathered_rewards = None
        self.add_callback(MetricsFileCallback())
        self.stopper = GracefulStopCallback(last_checkpoint)
        self.add_callback(self.stopper)
        # The whole run's totals in each checkpoint, so the summary after a resume covers the whole run, as train's.
        self.prior_totals, self.response_tokens = {}, 0.0
        self.add_callback(RunTotalsCallback(self))

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.prior_totals = read_totals(resume_from_checkpoint) if resume_from_checkpoint else {}
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # TRL private override (read from trl 1.16.0, GRPOTrainer._tokenize_prompts): rendered prompts -> token ids.
    def _tokenize_prompts(self, prompts):
        # Rendered prompts are tokenized as `asft eval` does (BOS once, no special tokens added twice).
        if prompts and isinstance(prompts[0], str):
            return [encode_prompt(p, self._tokenizer) for p in prompts], None, {}
        return super()._tokenize_prompts(prompts)

    # TRL private override (read from trl 1.16.0, GRPOTrainer._calculate_rewards): keeps the gathered rewards.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards  # every process's rows: groups may straddle processes
        return rewards

    # TRL private override (read from trl 1.16.0, GRPOTrainer._generate_and_score_completions): its output dict
    # (prompt_ids, completion_ids, completion_mask, num_items_in_batch, ...) is what the KL monitor and dynamic
    # sampling read and edit.
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.monitor_kl and self.model.training:
            self._log_reference_kl(out)
        if self.dynamic_sampling and self.model.training:
            self._drop_flat_groups(out)
        return out

    def _setup_kl_monitor(self, new_adapter: bool):
        """The starting point, for `kl` when the loss has no KL term: as TRL builds its reference for beta > 0
        (a frozen copy loaded from the start's folder; a frozen "ref" copy of a continued adapter; a new
        adapter switched off)."""
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import add_fused_lm_head, create_model_from_path, get_config_model_id

        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            if not new_adapter and "ref" not in model.peft_config:
                model.add_adapter("ref", model.peft_config["default"])
                for name, param in model.named_parameters():
                    if ".ref." in name:
                        param.requires_grad_(False)
                        param.data.copy_(model.get_parameter(name.replace(".ref.", ".default.")).data)
            return
        ref = create_model_from_path(get_config_model_id(model.config), dtype=model.dtype)
        ref.requires_grad_(False)
        # TRL scores tokens through a fused head it adds to its models (log-probs at its temperature)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        self._monitor_ref = self.accelerator.prepare_model(ref.eval(), evaluation_mode=True)

    @torch.no_grad()
    def _log_reference_kl(self, out):
        from trl.trainer.utils import use_adapter

        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        keep, batch = out["completion_ids"].size(1), self.args.per_device_train_batch_size
        logps = out.get("old_per_token_logps")
        if logps is None:
            logps = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch)[0]
        if self._monitor_ref is not None:
            ref = self._get_per_token_logps_and_entropies(self._monitor_ref, ids, attention, keep, batch)[0]
        else:
            model = self.accelerator.unwrap_model(self.model)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                ref = self._get_per_token_logps_and_entropies(self.model, ids, attention, keep, batch)[0]
        delta = ref - logps
        kl, mask = torch.exp(delta) - delta - 1, out["completion_mask"]  # TRL's estimator for its `kl`
        totals = self.accelerator.reduce(torch.stack([(kl * mask).sum(), mask.sum().float()]), reduction="sum")
        self._metrics["train"]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())

    def _drop_flat_groups(self, out):
        """DAPO's dynamic sampling, the smallest honest version: a group whose correctness rewards are all equal
        (all right or all wrong) has no advantage signal; its completions are masked out of the loss, so they
        neither dilute the token-level normaliser nor pull through the KL term. The paper refills the batch by
        sampling more prompts; here the batch shrinks (a step whose groups are all flat has zero loss)."""
        rewards = self._gathered_rewards
        if self.signal_column is not None:
            signal = rewards[:, self.signal_column]
        else:
            signal = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        grouped = signal.view(-1, self.num_generations)
        flat = torch.nan_to_num(grouped.max(dim=1).values - grouped.min(dim=1).values, nan=0.0) == 0
        keep = (~flat).repeat_interleave(self.num_generations)
        n = out["completion_ids"].size(0)
        start = self.accelerator.process_index * n
        local = keep[start : start + n].to(out["completion_mask"].dtype)
        out["completion_mask"] = out["completion_mask"] * local.unsqueeze(1)
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        self._metrics["train"]["dynamic_sampling/dropped_groups_frac"].append(flat.float().mean().item())

    # Metrics that average over the completions left in the loss: with every group dropped by dynamic sampling
    # they are undefined (TRL would log 0.0). `kl` is one of them only when TRL computes it (beta > 0).
    UNDEFINED_WHEN_ALL_DROPPED = ("entropy", "clip_ratio/")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        dropped = metrics.get("dynamic_sampling/dropped_groups_frac")
        if dropped and all(frac == 1.0 for frac in dropped):
            undefined = self.UNDEFINED_WHEN_ALL_DROPPED + (("kl",) if self.beta > 0 else ())
            for key in [k for k in metrics if k.startswith(undefined)]:
                del metrics[key]
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not math.isfinite(loss.detach().float().item()):
            last = last_checkpoint(self.args.output_dir)
            raise TrainingDivergedError(
                f"step {self.state.global_step + 1}: the RL loss is {loss.item()}. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was saved before this step.")
                + " Lower the learning rate, or use --bf16 instead of fp16."
            )
        return loss


def build_trainer(script: RLArguments, config, model, tokenizer, dataset, peft_config=None):
    from trl.rewards import get_soft_overlong_punishment

    specs = [s.strip() for s in (script.reward_funcs or "").split(",") if s.strip()]
    rewards = build_rewards(script.reward, script.format_reward, specs, script.reward_timeout)
    weights = [1.0] * len(rewards)
    if script.format_reward:
        weights[1] = script.format_reward_weight
    buffer = overlong_buffer(script, config)
    if buffer > 0:
        rewards.append(get_soft_overlong_punishment(config.max_completion_length, buffer))
        weights.append(1.0)
    if config.reward_weights is None:
        config.reward_weights = weights
    elif len(config.reward_weights) != len(rewards):
        names = ", ".join(getattr(r, "__name__", str(r)) for r in rewards)
        raise UsageError(f"reward_weights: {len(config.reward_weights)} weights for {len(rewards)} rewards ({names})")
    return AsftGRPOTrainer(
        model,
        reward_funcs=rewards,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        dynamic_sampling=dynamic_sampling_on(script),
        signal_column=0 if script.reward else None,
        monitor_kl=script.monitor_kl,
    )


def describe(script: RLArguments, config, trainer, reference: str, template: str) -> str:
    parts = [
        f"RL: {script.algorithm} (loss_type={config.loss_type}, epsilon={config.epsilon}, "
        f"epsilon_high={trainer.epsilon_high}, scale_rewards={config.scale_rewards}, beta={config.beta})",
        "rewards: " + ", ".join(f"{n} x{w:g}" for n, w in zip(trainer.reward_func_names, config.reward_weights)),
        f"dynamic sampling: {'on' if trainer.dynamic_sampling else 'off'}",
        f"template: {template}",
        "reference: "
        + (
            reference
            if config.beta > 0
            else "none in the loss (beta=0)" + (f"; kl logged against {reference}" if trainer.monitor_kl else "")
        ),
    ]
    return "; ".join(parts)
