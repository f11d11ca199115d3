"""AnchoredSFTTrainer: batch-split invariance, the LoRA reference, and the frozen-copy reference."""

import datasets
import pytest
import torch

from asft import AnchoredSFTConfig, AnchoredSFTTrainer
from asft.models import lora_config
from asft.training.reference import AdapterDisabledReference
from conftest import ADAMW_RUN, SGD_STEP, build_model, tiny_trainer


def uneven_dataset(tokenizer, n=8, seed=0):
    """n examples with prompts and responses of different lengths (so micro-batches hold unequal token counts)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(5, len(tokenizer) - 5, (3 + i % 3,), generator=g).tolist()
        response = torch.randint(5, len(tokenizer) - 5, (1 + (i * 5) % 9,), generator=g).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return datasets.Dataset.from_list(rows)


def one_sgd_step(tokenizer, tmp_path, mode, batch, accum, implementation, peft=False, device="cpu"):
    """Weights after one plain-SGD step (lr 1, no clipping), so the update is exactly minus the gradient."""
    out = tmp_path / f"{mode}-{batch}-{accum}-{implementation}"
    split = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accum, dataloader_drop_last=False)
    data, split["shuffle_dataset"] = uneven_dataset(tokenizer), False
    split.update(use_cpu=torch.device(device).type == "cpu", bf16=False)
    trainer = tiny_trainer(tokenizer, out, data, mode, implementation, peft=peft, kl_weight=0.5, **split, **SGD_STEP)
    # Same order whatever the batch size: the sampler is sequential.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.cuda_too
@pytest.mark.parametrize("implementation", ["naive", "fused"])
@pytest.mark.parametrize("mode", ["asft", "iw_sft"])
def test_gradient_does_not_depend_on_batch_split(tokenizer, tmp_path, mode, implementation, device):
    kw = dict(implementation=implementation, device=device)
    whole = one_sgd_step(tokenizer, tmp_path, mode, batch=8, accum=1, **kw)
    split = one_sgd_step(tokenizer, tmp_path, mode, batch=2, accum=4, **kw)
    assert whole.keys() == split.keys()
    start = {n: p for n, p in build_model(tokenizer, seed=1).named_parameters()}
    for name in whole:
        assert not torch.equal(whole[name], start[name]), f"{name} did not move"
        torch.testing.assert_close(whole[name], split[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.cuda_too
def test_fused_and_naive_paths_give_the_same_update(tokenizer, tmp_path, device):
    naive = one_sgd_step(tokenizer, tmp_path, "asft", batch=4, accum=2, implementation="naive", device=device)
    fused = one_sgd_step(tokenizer, tmp_path, "asft", batch=4, accum=2, implementation="fused", device=device)
    for name in naive:
        torch.testing.assert_close(naive[name], fused[name], rtol=1e-4, atol=1e-6, msg=name)


def loss_curve(tokenizer, tmp_path, mode, implementation, peft=False):
    """Per-step logged terms of a short AdamW run (metrics.jsonl), the model moving between steps."""
    import json

    out = tmp_path / f"curve-{mode}-{implementation}-{peft}"
    data = uneven_dataset(tokenizer)
    trainer = tiny_trainer(
        tokenizer, out, data, mode, implementation, peft=peft, kl_weight=0.5, max_steps=5, **ADAMW_RUN
    )
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "train_runtime" not in r]


@pytest.mark.parametrize("mode,peft", [("asft", False), ("iw_sft", False), ("asft", True)])
def test_fused_and_naive_paths_give_the_same_loss_curve(tokenizer, tmp_path, mode, peft):
    naive = loss_curve(tokenizer, tmp_path, mode, "naive", peft)
    fused = loss_curve(tokenizer, tmp_path, mode, "fused", peft)
    assert [r["step"] for r in naive] == [r["step"] for r in fused] == [1, 2, 3, 4, 5]
    keys = ["loss", "nll", "weighted_nll", "kl", "mean_prob", "entropy", "token_accuracy", "grad_norm"]
    assert len({round(r["nll"], 4) for r in naive}) > 1, "the model did not move between steps"
    assert naive[-1]["kl"] > 1e-4, "the reference moved with the policy"
    # Step 1 agrees to float32 rounding; later steps to 1e-3: AdamW divides each gradient by its own magnitude, so
    # the paths' ~1e-7 rounding differences in near-zero gradient components become visible weight differences.
    for n, f in zip(naive, fused):
        for key in keys:
            rel = 1e-5 if f["step"] == 1 else 1e-3
            assert f[key] == pytest.approx(n[key], rel=rel, abs=1e-6), (f["step"], key)


def test_lora_gradient_does_not_depend_on_batch_split(tokenizer, tmp_path):
    whole = one_sgd_step(tokenizer, tmp_path, "asft", batch=8, accum=1, implementation="fused", peft=True)
    split = one_sgd_step(tokenizer, tmp_path, "asft", batch=2, accum=4, implementation="fused", peft=True)
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_reference_is_the_base_model(tokenizer):
    from peft import get_peft_model

    base = build_model(tokenizer, seed=3)
    expected = base(input_ids=torch.arange(5, 17)[None]).logits
    peft_model = get_peft_model(build_model(tokenizer, seed=3), lora_config(4, 8, 0.0, "all-linear"))
    with torch.no_grad():  # make the adapters matter (LoRA B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inputs = {"input_ids": torch.arange(5, 17)[None]}
    assert not torch.allclose(peft_model(**inputs).logits, expected, atol=1e-3)
    reference = AdapterDisabledReference(peft_model)
    torch.testing.assert_close(reference.logits(inputs), expected)
    hidden = reference.hidden(inputs)
    torch.testing.assert_close(hidden @ reference.head().weight.T, expected, rtol=1e-5, atol=1e-5)
    # ... and the adapters are active again afterwards.
    assert not torch.allclose(peft_model(**inputs).logits, expected, atol=1e-3)


def test_frozen_reference_is_loaded_from_the_checkpoint_and_never_trained(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = AnchoredSFTConfig(
        output_dir=str(tmp_path / "out"),
        mode="asft",
        max_steps=2,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = AnchoredSFTTrainer(model, args=args, train_dataset=uneven_dataset(tokenizer), processing_class=tokenizer)
    ref = trainer.ref_model
    assert ref is not model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    before = {n: p.clone() for n, p in ref.named_parameters()}
    trainer.train()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p, before[name])
        torch.testing.assert_close(p, dict(original.named_parameters())[name])
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_modes_without_reference_load_none(tokenizer, tmp_path):
    args = AnchoredSFTConfig(output_dir=str(tmp_path / "o"), mode="dft", report_to="none", use_cpu=True)
    trainer = AnchoredSFTTrainer(
        build_model(tokenizer), args=args, train_dataset=uneven_dataset(tokenizer), processing_class=tokenizer
    )
    assert trainer.reference is None and trainer.ref_model is None


def test_config_rejects_bad_values():
    from asft.errors import ConfigError

    for kwargs, field in [
        ({"kl_weight": -0.1}, "kl_weight"),
        ({"mode": "ppo"}, "mode"),
        ({"kl_direction": "sideways"}, "kl_direction"),
        ({"iw_max": 0}, "iw_max"),
        ({"loss_implementation": "magic"}, "loss_implementation"),
    ]:
        with pytest.raises(ConfigError, match=field):
            AnchoredSFTConfig(output_dir="unused", **kwargs)
    assert AnchoredSFTConfig(output_dir="unused", mode="sft+kl").mode == "sft_kl"


def test_the_python_api_refuses_an_empty_completion_as_the_cli_does(tokenizer, tmp_path):
    from asft.errors import DataError

    rows = [{"prompt": "what is 2 + 2", "completion": "4"}, {"prompt": "and 3 + 3", "completion": " "}]
    args = AnchoredSFTConfig(output_dir=str(tmp_path / "o"), mode="sft", report_to="none", use_cpu=True)
    with pytest.raises(DataError, match="train_dataset:2: field 'completion': empty"):
        AnchoredSFTTrainer(
            build_model(tokenizer),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
