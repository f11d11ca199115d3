"""Trainer steps on the --device of tests/conftest.py (cpu unless given), in float32 and in bf16 mixed precision:
the fused and the naive loss give the same step. `pytest -m cuda_too --device cuda` runs these on a GPU."""

import datasets
import pytest
import torch

from conftest import SGD_STEP, build_model, tiny_trainer


def sgd_step(tokenizer, out, device, mode, implementation, bf16):
    """The logged loss and the weight update of one plain-SGD step (lr 1: the update is minus the gradient)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        ids = torch.randint(5, len(tokenizer) - 5, (12 + 3 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (4 + i) + ids[4 + i :]})
    model = build_model(tokenizer, seed=1)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    data, split = datasets.Dataset.from_list(rows), dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    on = dict(bf16=bf16, use_cpu=device.type == "cpu", shuffle_dataset=False)
    trainer = tiny_trainer(
        tokenizer, out, data, mode, implementation, model=model, kl_weight=0.5, **split, **on, **SGD_STEP
    )
    trainer.train()
    assert next(trainer.model.parameters()).device.type == device.type
    update = torch.cat([p.detach().cpu().flatten() for p in trainer.model.parameters()]) - start
    return trainer.state.log_history[0]["loss"], update


@pytest.mark.cuda_too
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("mode", ["sft", "asft"])
def test_fused_and_naive_trainer_steps_agree(tokenizer, tmp_path, device, mode, bf16):
    naive = sgd_step(tokenizer, tmp_path / "naive", device, mode, "naive", bf16)
    fused = sgd_step(tokenizer, tmp_path / "fused", device, mode, "fused", bf16)
    # bf16: both paths' matmuls round to 8 mantissa bits (the fused one per chunk), the softmax math is float32.
    rel, cos = (2e-2, 0.99) if bf16 else (1e-5, 1 - 1e-6)
    assert fused[0] == pytest.approx(naive[0], rel=rel)
    assert naive[1].abs().max() > 0
    assert torch.nn.functional.cosine_similarity(fused[1], naive[1], dim=0) > cos
