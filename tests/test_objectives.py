"""asft.objectives against an independent, deliberately plain implementation written here (float64, per token)."""

import math

import pytest
import torch

from asft.objectives import MODES, normalize_mode, token_loss


def reference_loss(mode, logits, labels, ref_logits, kl_weight, direction, iw_max, iw_level, n_items):
    """Per-token loop in float64 straight from DESIGN.md's table; weights are constants (no gradient)."""
    total = logits.new_zeros((), dtype=torch.float64)
    B, T, _ = logits.shape
    for b in range(B):
        toks = [t for t in range(1, T) if labels[b, t] != -100]
        log_ratios = []
        for t in toks:
            lp = torch.log_softmax(logits[b, t - 1].double(), -1)
            lr = torch.log_softmax(ref_logits[b, t - 1].double(), -1) if ref_logits is not None else None
            if lr is not None:
                log_ratios.append(float((lp[labels[b, t]] - lr[labels[b, t]]).detach()))
        seq_w = min(math.exp(sum(log_ratios) / len(log_ratios)), iw_max) if toks and log_ratios else 1.0
        for i, t in enumerate(toks):
            y = labels[b, t]
            lp = torch.log_softmax(logits[b, t - 1].double(), -1)
            ce = -lp[y]
            p_y = float(lp[y].detach().exp())
            if mode in ("sft", "sft_kl"):
                w = 1.0
            elif mode in ("dft", "asft"):
                w = p_y
            elif iw_level == "sequence":
                w = seq_w
            else:
                w = min(max(math.exp(log_ratios[i]), 0.2), 1.8)
            loss = w * ce
            if mode in ("sft_kl", "asft"):
                lr = torch.log_softmax(ref_logits[b, t - 1].double(), -1)
                if direction == "forward":
                    kl = (lr.exp() * (lr - lp)).sum()
                else:
                    kl = (lp.exp() * (lp - lr)).sum()
                loss = loss + kl_weight * kl
            total = total + loss
    return total / n_items


def make_batch(seed=0, B=3, T=9, V=37, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ref = logits + torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :7] = -100  # short response
    labels[2, 2:5] = -100  # a hole in the middle
    return logits.to(device), ref.to(device), labels.to(device)


CASES = [(m, "forward", "sequence") for m in MODES] + [
    ("sft_kl", "reverse", "sequence"),
    ("asft", "reverse", "sequence"),
    ("iw_sft", "forward", "token"),
]


@pytest.mark.cuda_too
@pytest.mark.parametrize("mode,direction,iw_level", CASES)
def test_loss_and_gradient_match_plain_implementation(mode, direction, iw_level, device):
    logits, ref, labels = make_batch(device=device)
    n_items = 17  # as if other micro-batches of the step held more tokens
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().double().requires_grad_()
    ref_arg = ref if mode in ("sft_kl", "asft", "iw_sft") else None
    loss, terms = token_loss(
        mode,
        ours,
        labels,
        ref_arg,
        kl_weight=0.1,
        kl_direction=direction,
        iw_max=1.5,
        iw_level=iw_level,
        num_items_in_batch=n_items,
    )
    expected = reference_loss(mode, theirs, labels, ref_arg, 0.1, direction, 1.5, iw_level, n_items)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    assert terms["num_tokens"] == int((labels[:, 1:] != -100).sum())


@pytest.mark.cuda_too
def test_logged_terms(device):
    logits, ref, labels = make_batch(1, device=device)
    loss, terms = token_loss("asft", logits, labels, ref, kl_weight=0.0)
    mask = labels[:, 1:] != -100
    lp = torch.log_softmax(logits[:, :-1].double(), -1)[mask]
    y = labels[:, 1:][mask]
    nll = -lp.gather(-1, y[:, None]).squeeze(-1)
    assert terms["nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert terms["mean_prob"] == pytest.approx(float((-nll).exp().mean()), rel=1e-5)
    assert terms["weighted_nll"] == pytest.approx(float(((-nll).exp() * nll).mean()), rel=1e-5)
    assert terms["weighted_nll"] == pytest.approx(float(loss), rel=1e-5)  # kl_weight=0: loss is the DFT term
    assert terms["token_accuracy"] == pytest.approx(float((lp.argmax(-1) == y).double().mean()))
    assert terms["entropy"] == pytest.approx(float(-(lp.exp() * lp).sum(-1).mean()), rel=1e-5)
    assert terms["kl"] > 0


@pytest.mark.cuda_too
def test_kl_is_zero_when_policy_equals_reference(device):
    logits, _, labels = make_batch(2, device=device)
    loss_asft, terms = token_loss("asft", logits, labels, logits.clone(), kl_weight=1.0)
    loss_dft, _ = token_loss("dft", logits, labels)
    assert terms["kl"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(loss_asft, loss_dft)


@pytest.mark.cuda_too
def test_bf16_logits_are_computed_in_float32(device):
    logits, ref, labels = make_batch(3, device=device)
    l16, _ = token_loss("asft", logits.bfloat16(), labels, ref.bfloat16())
    l32, _ = token_loss("asft", logits.bfloat16().float(), labels, ref.bfloat16().float())
    assert l16.dtype == torch.float32
    torch.testing.assert_close(l16, l32)


@pytest.mark.cuda_too
def test_no_response_tokens_gives_a_connected_zero(device):
    logits = torch.randn(2, 5, 11, requires_grad=True, device=device)
    labels = torch.full((2, 5), -100, device=device)
    loss, terms = token_loss("asft", logits, labels, logits.detach())
    loss.backward()
    assert float(loss) == 0.0 and terms["num_tokens"] == 0
    assert torch.count_nonzero(logits.grad) == 0


def test_mode_validation():
    assert normalize_mode("sft+kl") == "sft_kl"
    with pytest.raises(ValueError, match="mode"):
        normalize_mode("ppo")
    logits, ref, labels = make_batch()
    with pytest.raises(ValueError, match="reference"):
        token_loss("asft", logits, labels)
    with pytest.raises(ValueError, match="kl_weight"):
        token_loss("asft", logits, labels, ref, kl_weight=-1)
