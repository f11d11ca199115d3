"""asft.objectives against an independent, deliberately plain implementation written here (float64, per token)."""

import math

import pytest
import torch

from asft.objectives import MODES, ObjectiveSettings, normalize_mode, token_loss, token_weights


def reference_loss(mode, logits, labels, ref_logits, kl_weight, direction, iw_max, iw_level, n_items, **rule):
    """Per-token loop in float64 straight from DESIGN.md's tables; weights are constants (no gradient).

    `rule`: weight_power, weight_floor, eaft_topk, eaft_power, anchor (the defaults where absent)."""
    power, floor = rule.get("weight_power", 1.0), rule.get("weight_floor", 0.0)
    topk, eaft_power = rule.get("eaft_topk", 20), rule.get("eaft_power", 1.0)
    anchored = mode in ("sft_kl", "asft") or bool(rule.get("anchor"))
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
            z = logits[b, t - 1].double()
            lp = torch.log_softmax(z, -1)
            ce = -lp[y]
            p_y = float(lp[y].detach().exp())
            if mode in ("sft", "sft_kl"):
                w = 1.0
            elif mode in ("dft", "asft"):
                w = p_y**power
            elif mode == "eaft":  # the entropy of the softmax over the k largest logits, / 3, ^ alpha
                top = sorted(z.detach().tolist(), reverse=True)[:topk]
                q = [math.exp(v - max(top)) for v in top]
                q = [x / sum(q) for x in q]
                w = (-sum(x * math.log(x) for x in q if x > 0) / 3.0) ** eaft_power
            elif mode == "prift":  # the reference's probability of the label
                w = math.exp(float(torch.log_softmax(ref_logits[b, t - 1].double(), -1)[y]))
            elif iw_level == "sequence":
                w = seq_w
            else:
                w = min(max(math.exp(log_ratios[i]), 0.2), 1.8)
            if mode not in ("sft", "sft_kl"):
                w = max(w, floor)
            loss = w * ce
            if anchored:
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


# Every rule with each of its parameters away from its default; each runs bare and anchored (both directions).
RULES = [
    ("sft", {}),
    ("dft", {}),
    ("dft", {"weight_power": 0.5}),
    ("dft", {"weight_power": 0.25, "weight_floor": 0.05}),
    ("asft", {"weight_power": 0.3}),
    ("asft", {"weight_floor": 0.2}),
    ("sft_kl", {}),
    ("iw_sft", {"iw_level": "sequence"}),
    ("iw_sft", {"iw_level": "token", "weight_floor": 0.5}),
    ("eaft", {}),
    ("eaft", {"eaft_topk": 5, "eaft_power": 0.7}),
    ("eaft", {"eaft_topk": 100, "weight_floor": 0.9}),  # k > V: the full softmax's entropy
    ("prift", {}),
    ("prift", {"weight_floor": 0.1}),
]
RULE_CASES = [
    (mode, {**params, **({"anchor": True} if anchor and mode not in ("sft_kl", "asft") else {})}, direction)
    for mode, params in RULES
    for anchor in (False, True)
    if not (anchor is False and mode in ("sft_kl", "asft"))
    for direction in (("forward", "reverse") if anchor else ("forward",))
]


def test_every_registered_rule_is_tested():
    # A new rule in WEIGHT_RULES must join RULES (and so the naive, fused and independent comparisons).
    assert {mode for mode, _, _ in RULE_CASES} == set(MODES)


def case_id(case):
    mode, params, direction = case
    return "-".join([mode, *(f"{k}={v}" for k, v in params.items()), direction])


# Tolerances from float32 rounding: each float32 log-softmax entry carries a relative error of a few units of
# 2^-24 ~ 6e-8 (the log-sum-exp sums V = 37 terms: <= ~40 ulp), the weights (exp, pow, a top-k entropy) a few ulp
# more, and the loss sums ~20 tokens, each a product of two such terms: well under 1e-6 relative, so 1e-5 leaves
# a 10x margin and would still catch any wrong weight or missing term (those move the loss by > 1e-3 here).
@pytest.mark.cuda_too
@pytest.mark.parametrize("mode,params,direction", RULE_CASES, ids=[case_id(c) for c in RULE_CASES])
def test_loss_and_gradient_match_plain_implementation(mode, params, direction, device):
    logits, ref, labels = make_batch(device=device)
    n_items = 17  # as if other micro-batches of the step held more tokens
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().double().requires_grad_()
    settings = ObjectiveSettings(mode, **params)
    ref_arg = ref if settings.needs_reference else None
    kw = dict(kl_weight=0.1, kl_direction=direction, iw_max=1.5)
    loss, terms = token_loss(mode, ours, labels, ref_arg, num_items_in_batch=n_items, **kw, **params)
    level = params.get("iw_level", "sequence")
    rule = {k: v for k, v in params.items() if k != "iw_level"}
    expected = reference_loss(mode, theirs, labels, ref_arg, 0.1, direction, 1.5, level, n_items, **rule)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-6)
    assert terms["num_tokens"] == int((labels[:, 1:] != -100).sum())
    assert ("kl" in terms) == settings.needs_reference


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


def loss_and_grad(mode, logits, labels, ref=None, **kw):
    x = logits.clone().requires_grad_()
    loss, terms = token_loss(mode, x, labels, ref, **kw)
    loss.backward()
    return loss.detach(), x.grad, terms


def test_weight_power_one_is_dft_and_zero_is_sft_and_a_floor_of_one_is_sft_bit_for_bit():
    logits, ref, labels = make_batch(4)
    logp_y = torch.log_softmax(logits, -1)[:, :-1][labels[:, 1:] != -100].gather(
        -1, labels[:, 1:][labels[:, 1:] != -100][:, None]
    )[:, 0]
    assert torch.equal(token_weights("dft", logp_y, weight_power=1.0), logp_y.exp())  # DFT's own weight
    sft, dft = loss_and_grad("sft", logits, labels), loss_and_grad("dft", logits, labels)
    for got, want in [
        (loss_and_grad("dft", logits, labels, weight_power=1.0), dft),
        (loss_and_grad("dft", logits, labels, weight_power=0.0), sft),
        (loss_and_grad("dft", logits, labels, weight_floor=1.0), sft),
        (loss_and_grad("asft", logits, labels, ref, weight_power=0.0, kl_weight=0.2), None),
    ]:
        if want is None:  # asft at alpha 0 is sft_kl
            want = loss_and_grad("sft_kl", logits, labels, ref, kl_weight=0.2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_anchor_adds_the_kl_term_to_any_rule():
    logits, ref, labels = make_batch(5)
    asft = loss_and_grad("asft", logits, labels, ref, kl_weight=0.2)
    spelled = loss_and_grad("dft", logits, labels, ref, kl_weight=0.2, anchor=True)
    assert torch.equal(asft[0], spelled[0]) and torch.equal(asft[1], spelled[1])
    bare = loss_and_grad("eaft", logits, labels, ref)
    anchored = loss_and_grad("eaft", logits, labels, ref, kl_weight=0.2, anchor=True)
    # Without num_items_in_batch the loss is a mean over tokens: the anchor adds 0.2 x the mean KL.
    assert float(anchored[0] - bare[0]) == pytest.approx(0.2 * anchored[2]["kl"], rel=1e-5)


def test_weight_distribution_is_logged():
    logits, ref, labels = make_batch(6)
    _, _, terms = loss_and_grad("prift", logits, labels, ref)
    mask = labels[:, 1:] != -100
    rho_y = torch.softmax(ref[:, :-1], -1)[mask].gather(-1, labels[:, 1:][mask][:, None])[:, 0]
    assert terms["mean_weight"] == pytest.approx(float(rho_y.mean()), rel=1e-5)
    assert terms["frac_weight_below_0.1"] == pytest.approx(float((rho_y < 0.1).float().mean()))
    assert 0 < terms["frac_weight_below_0.1"] < 1


@pytest.mark.parametrize(
    "mode,kw,match",
    [
        ("sft", {"weight_power": 0.5}, "weight_power: mode 'sft'.*dft, asft"),
        ("eaft", {"weight_power": 0.5}, "weight_power: mode 'eaft'"),
        ("sft_kl", {"weight_floor": 0.1}, "weight_floor: mode 'sft_kl'"),
        ("dft", {"eaft_topk": 5}, "eaft_topk: mode 'dft'.*eaft"),
        ("prift", {"eaft_power": 2.0}, "eaft_power: mode 'prift'"),
        ("asft", {"anchor": False}, "anchor: mode 'asft'"),
        ("dft", {"weight_power": -1.0}, "weight_power: must be >= 0"),
        ("eaft", {"eaft_topk": 0}, "eaft_topk"),
        ("prift", {}, "needs reference"),  # PriFT reads the reference's p(y) even unanchored
        ("eaft", {"anchor": True}, "needs reference"),
    ],
)
def test_a_setting_the_mode_would_ignore_is_an_error_naming_both(mode, kw, match):
    logits, _, labels = make_batch()
    with pytest.raises(ValueError, match=match):
        token_loss(mode, logits, labels, **kw)
