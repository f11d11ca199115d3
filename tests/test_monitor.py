"""--monitor_kl: sft / dft log the KL to their reference without any change to their loss, gradient or weights."""

import json

import pytest
import torch

from asft import AnchoredSFTConfig
from conftest import ADAMW_RUN, tiny_trainer
from test_trainer import uneven_dataset


def short_run(tokenizer, out, mode, monitor, implementation="fused", peft=False):
    """Weights and per-step logged records of a 4-step AdamW run that moves the weights a lot."""
    data = uneven_dataset(tokenizer)
    trainer = tiny_trainer(
        tokenizer, out, data, mode, implementation, peft=peft, monitor_kl=monitor, max_steps=4, **ADAMW_RUN
    )
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, weights, [r for r in rows if "loss" in r and "train_runtime" not in r]


@pytest.mark.parametrize(
    "mode,implementation,peft",
    [("sft", "fused", False), ("dft", "fused", False), ("dft", "naive", False), ("sft", "fused", True)],
)
def test_monitor_kl_changes_nothing_but_the_log(tokenizer, tmp_path, mode, implementation, peft):
    _, plain, plain_log = short_run(tokenizer, tmp_path / "plain", mode, False, implementation, peft)
    trainer, watched, watched_log = short_run(tokenizer, tmp_path / "watched", mode, True, implementation, peft)
    assert trainer.reference is not None
    assert plain.keys() == watched.keys()
    for name in plain:  # bit-identical, not merely close
        assert torch.equal(plain[name], watched[name]), name
    assert len(plain_log) == len(watched_log) == 4
    for a, b in zip(plain_log, watched_log):
        assert "kl" not in a
        assert a["loss"] == b["loss"] and a["nll"] == b["nll"]
    kls = [r["kl"] for r in watched_log]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # step 1 runs on the starting weights: policy == reference
    assert all(kl > 1e-4 for kl in kls[1:]), kls  # the weights moved, so the policy left its reference
    assert kls[-1] > kls[1]


def test_monitor_kl_is_off_by_default_and_modes_with_a_reference_need_no_flag():
    assert AnchoredSFTConfig(output_dir="x", mode="sft").needs_reference is False
    assert AnchoredSFTConfig(output_dir="x", mode="dft", monitor_kl=True).needs_reference is True
    assert AnchoredSFTConfig(output_dir="x", mode="asft").needs_reference is True
