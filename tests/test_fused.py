"""asft.fused against the naive asft.objectives path on full logits formed by the same head."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asft import fused
from asft.fused import LMHead, fused_loss_selected, fused_token_loss, lm_head_of
from asft.objectives import MODES, needs_reference, token_loss
from test_objectives import RULE_CASES, case_id

V, H = 389, 24  # a vocabulary that is not a power of two


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    # Tests must not depend on torch.compile (nor pay for compiling): the eager chunk functions are the same code.
    monkeypatch.setattr(fused.KERNELS, "compiled", False)


def make_batch(seed=0, B=5, T=14, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    ref_hidden = (hidden.float() + 0.5 * torch.randn(B, T, H, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    masks = [
        slice(0, T - 4),  # short response (3 tokens)
        slice(0, T),  # no response tokens at all
        slice(0, 2),  # long response (longer than a chunk)
        slice(3, 6),  # a hole in the middle
        slice(0, T // 2),
    ]
    for row, cut in zip(labels, masks):
        row[cut] = -100
    return hidden.to(device), ref_hidden.to(device), labels.to(device)


def make_heads(variant, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w, rw = torch.randn(V, H, generator=g) * 0.4, torch.randn(V, H, generator=g) * 0.4
    b, rb = torch.randn(V, generator=g) * 0.5, torch.randn(V, generator=g) * 0.5
    w, rw, b, rb = (t.to(device) for t in (w, rw, b, rb))
    scale, cap = (0.8, 4.0) if variant == "scale_softcap" else (1.0, None)
    with_bias = variant != "plain"
    head = LMHead(w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_() if with_bias else None, scale, cap)
    ref_head = LMHead(rw.to(dtype), rb.to(dtype) if with_bias else None, scale, cap)  # a frozen copy, trained apart
    return head, ref_head


def run(path, mode, hidden, ref_hidden, labels, head, ref_head, chunk_size=5, **kw):
    """Loss, metrics and the gradients of hidden / weight / bias of one path on fresh leaves."""
    h = hidden.detach().clone().requires_grad_()
    w = head.weight.detach().clone().requires_grad_(head.weight.requires_grad)
    b = None if head.bias is None else head.bias.detach().clone().requires_grad_()
    head = LMHead(w, b, head.logit_scale, head.softcap)
    ref_h = ref_hidden if needs_reference(mode, kw.get("anchor")) else None
    if path == "naive":
        ref_logits = None if ref_h is None else ref_head.logits(ref_h)
        loss, terms = token_loss(mode, head.logits(h), labels, ref_logits, **kw)
    else:
        loss, terms = fused_token_loss(mode, h, labels, head, ref_h, ref_head, chunk_size=chunk_size, **kw)
    loss.backward()
    return loss.detach(), terms, [h.grad, w.grad, None if b is None else b.grad]


def assert_close(actual, expected, rtol):
    # Relative to the tensor's scale: entries that cancel to ~0 cannot meet a pure elementwise rtol.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()))


CASES = [
    ("sft", "forward", "sequence"),
    ("dft", "forward", "sequence"),
    ("sft_kl", "forward", "sequence"),
    ("sft_kl", "reverse", "sequence"),
    ("asft", "forward", "sequence"),
    ("asft", "reverse", "sequence"),
    ("iw_sft", "forward", "sequence"),
    ("iw_sft", "forward", "token"),
]


def assert_fused_matches_naive(mode, hidden, ref_hidden, labels, head, ref_head, **kw):
    """The fused loss equals the naive one (loss, every logged term, every gradient) at chunk 5, which divides
    neither the 31 response tokens nor row 2's 11, and at chunk 64, which holds every sequence whole."""
    loss, terms, grads = run("naive", mode, hidden, ref_hidden, labels, head, ref_head, **kw)
    for chunk_size in (5, 64):
        f_loss, f_terms, f_grads = run("fused", mode, hidden, ref_hidden, labels, head, ref_head, chunk_size, **kw)
        assert_close(f_loss, loss, 1e-5)
        assert f_terms.keys() == terms.keys()
        for key in terms:
            assert f_terms[key] == pytest.approx(terms[key], rel=1e-5, abs=1e-6), key
        for f_g, g in zip(f_grads, grads):
            assert (f_g is None) == (g is None)
            if g is not None:
                assert_close(f_g, g, 1e-5)


@pytest.mark.cuda_too
@pytest.mark.parametrize("variant", ["plain", "bias", "scale_softcap"])
@pytest.mark.parametrize("n_items", [None, 37])
@pytest.mark.parametrize("mode,direction,iw_level", CASES)
def test_matches_naive_float32(mode, direction, iw_level, n_items, variant, device):
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads(variant, device=device)
    kw = dict(kl_weight=0.3, kl_direction=direction, iw_max=1.7, iw_level=iw_level, num_items_in_batch=n_items)
    assert_fused_matches_naive(mode, hidden, ref_hidden, labels, head, ref_head, **kw)


@pytest.mark.cuda_too
@pytest.mark.parametrize("variant", ["plain", "scale_softcap"])
@pytest.mark.parametrize("mode,params,direction", RULE_CASES, ids=[case_id(c) for c in RULE_CASES])
def test_every_rule_matches_naive_float32(mode, params, direction, variant, device):
    # Every weight rule and parameter, bare and anchored (the naive path is checked against an independent
    # implementation in test_objectives): the fused path gives the same loss, terms and gradients. EAFT's top-k
    # entropy comes from the fused chunk's logits, here after the logit scale and soft-cap.
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads(variant, device=device)
    kw = dict(kl_weight=0.3, kl_direction=direction, iw_max=1.7, num_items_in_batch=37, **params)
    assert_fused_matches_naive(mode, hidden, ref_hidden, labels, head, ref_head, **kw)


@pytest.mark.cuda_too
def test_token_order_within_rows_does_not_matter(device):
    # iw-SFT needs each sequence whole before its weight; with a row's tokens scattered it must still be exact.
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads("bias", device=device)
    h, y = hidden[:, :-1][labels[:, 1:] != -100], labels[:, 1:][labels[:, 1:] != -100]
    rows = (labels[:, 1:] != -100).nonzero()[:, 0]
    r = ref_hidden[:, :-1][labels[:, 1:] != -100]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    kw = dict(kl_weight=0.3, iw_max=1.7, chunk_size=4)
    h1, h2 = h.clone().requires_grad_(), h[perm].clone().requires_grad_()
    l1, t1 = fused_loss_selected("iw_sft", h1, y, rows, head, r, ref_head, **kw)
    l2, t2 = fused_loss_selected("iw_sft", h2, y[perm], rows[perm], head, r[perm], ref_head, **kw)
    (l1 + l2).backward()
    assert_close(l2, l1, 1e-5)
    assert_close(h2.grad, h1.grad[perm], 1e-5)
    assert t2 == pytest.approx(t1, rel=1e-5)


@pytest.mark.cuda_too
def test_lora_reference_shares_the_frozen_weight(device):
    # Under LoRA the lm_head is frozen and the reference is the same weight: no weight gradient is computed at all.
    hidden, ref_hidden, labels = make_batch(device=device)
    head, _ = make_heads("plain", device=device)
    frozen = LMHead(head.weight.detach())
    loss, terms, grads = run("naive", "asft", hidden, ref_hidden, labels, frozen, frozen)
    f_loss, f_terms, f_grads = run("fused", "asft", hidden, ref_hidden, labels, frozen, None)  # ref_head = head
    assert_close(f_loss, loss, 1e-5)
    assert_close(f_grads[0], grads[0], 1e-5)
    assert f_grads[1] is None and f_terms == pytest.approx(terms, rel=1e-5)


@pytest.mark.cuda_too
def test_no_response_tokens_gives_a_connected_zero(device):
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads("bias", device=device)
    labels[:] = -100
    loss, terms, (gh, gw, gb) = run("fused", "asft", hidden, ref_hidden, labels, head, ref_head)
    assert float(loss) == 0.0 and terms == {"num_tokens": 0.0}
    assert not gh.any() and not gw.any() and not gb.any()


@pytest.mark.cuda_too
def test_gradient_scales_with_grad_output(device):
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads("bias", device=device)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_token_loss("asft", h, labels, head, ref_hidden, ref_head, chunk_size=5)
    (loss * 3).backward()  # DDP's loss * world_size, GradScaler, ...
    _, _, grads = run("naive", "asft", hidden, ref_hidden, labels, head, ref_head)
    assert_close(h.grad, 3 * grads[0], 1e-5)
    assert_close(head.weight.grad, 3 * grads[1], 1e-5)


@pytest.mark.cuda_too
def test_bfloat16_close_to_float32_naive(device):
    hidden, ref_hidden, labels = make_batch(dtype=torch.bfloat16, device=device)
    head, ref_head = make_heads("bias", dtype=torch.bfloat16, device=device)
    # Tolerance: the float32 reference sees the very same (bf16-valued) inputs, so the differences are the fused
    # path's roundings to bf16. Each logit leaves the bf16 matmul with a relative error up to 2^-8; logits reach
    # |z| ~ 9 here, so up to ~0.035 absolute, which moves a probability (and so an entry of the softmax-weighted
    # gradients, or a log-prob in the loss) by up to e^0.035 - 1 ~ 3.5% in the worst case; the hidden-state
    # gradient also goes through a bf16 matmul (another 2^-8). Errors mostly average out over tokens and vocabulary:
    # observed <= 1.2e-3 on the loss and <= 8e-3 (of the largest entry) on the gradients. Hence 3e-2. The float32
    # tests pin the math; this one pins the bf16 handling (dtypes, float32 softmax and accumulation).
    as32 = lambda x: None if x is None else x.float()  # noqa: E731
    head32 = LMHead(as32(head.weight).requires_grad_(), as32(head.bias).requires_grad_())
    ref32 = LMHead(as32(ref_head.weight), as32(ref_head.bias))
    for mode in ("sft", "asft", "iw_sft"):
        loss, terms, grads = run("naive", mode, hidden.float(), ref_hidden.float(), labels, head32, ref32)
        f_loss, f_terms, f_grads = run("fused", mode, hidden, ref_hidden, labels, head, ref_head)
        assert f_loss.dtype == torch.float32 and f_grads[1].dtype == torch.bfloat16
        assert_close(f_loss, loss, 3e-2)
        for f_g, g in zip(f_grads, grads):
            assert_close(f_g.float(), g, 3e-2)
        assert f_terms["kl" if mode != "sft" else "nll"] == pytest.approx(
            terms["kl" if mode != "sft" else "nll"], rel=3e-2
        )


@pytest.mark.cuda_too
def test_autocast_float32_master_weights(device):
    # --bf16 is autocast over float32 weights: the matmuls run in bf16, the weight gradient comes back in float32.
    hidden, ref_hidden, labels = make_batch(device=device)
    head, ref_head = make_heads("bias", device=device)
    loss, _, grads = run("naive", "asft", hidden, ref_hidden, labels, head, ref_head)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        f_loss, _, f_grads = run("fused", "asft", hidden, ref_hidden, labels, head, ref_head)
    assert f_grads[0].dtype == f_grads[1].dtype == torch.float32
    assert_close(f_loss, loss, 3e-2)
    assert_close(f_grads[1], grads[1], 3e-2)


class VocabProbe(TorchDispatchMode):
    """Records the shape of every tensor any op creates with a vocabulary-sized axis, and the rows of every logits
    matmul (an mm / addmm whose output is [rows, V])."""

    def __init__(self):
        super().__init__()
        self.shapes, self.logit_rows = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and V in t.shape:
                self.shapes.append(tuple(t.shape))
                if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and t.shape[-1] == V:
                    self.logit_rows.append(t.shape[0])
        return out


@pytest.mark.cuda_too
@pytest.mark.parametrize("mode", MODES)
def test_no_tokens_by_vocab_tensor_and_only_response_rows_reach_the_head(mode, device):
    hidden, ref_hidden, labels = make_batch(B=3, T=30, device=device)  # 40+ response tokens > H = 24 > chunk 4
    head, ref_head = make_heads("bias", device=device)
    n = int((labels[:, 1:] != -100).sum())
    with VocabProbe() as probe:
        run("fused", mode, hidden, ref_hidden, labels, head, ref_head, chunk_size=4)
    # Nothing beyond a chunk of logits or the [V, H] weight gradient; [n, V] would be 40+ rows.
    assert probe.shapes and max(s[0] * s[1] if len(s) == 2 else s[0] for s in probe.shapes) <= V * H
    assert probe.logit_rows and max(probe.logit_rows) <= 4
    passes = (2 if needs_reference(mode) else 1) + (mode == "iw_sft")  # iw-SFT: long rows take a weight pass
    assert n <= sum(probe.logit_rows) <= passes * n


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(fused, "KERNELS", fused._Kernels())
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("ASFT_COMPILE", "1")
    hidden, ref_hidden, labels = make_batch()
    head, ref_head = make_heads("plain")
    with pytest.warns(UserWarning, match="running eager"):
        f_loss, _, _ = run("fused", "asft", hidden, ref_hidden, labels, head, ref_head)
    loss, _, _ = run("naive", "asft", hidden, ref_hidden, labels, head, ref_head)
    assert_close(f_loss, loss, 1e-5)
    assert fused.KERNELS.compiled is False


def test_bad_arguments():
    hidden, _, labels = make_batch()
    head, _ = make_heads("plain")
    with pytest.raises(ValueError, match="needs reference"):
        fused_token_loss("asft", hidden, labels, head)
    with pytest.raises(ValueError, match="mode"):
        fused_token_loss("ppo", hidden, labels, head)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_token_loss("sft", hidden, labels, head, chunk_size=0)


@pytest.mark.cuda_too
@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_end_to_end(tokenizer, tie, device):
    from conftest import build_model

    policy, reference = build_model(tokenizer, tie=tie).to(device), build_model(tokenizer, tie=tie, seed=1).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (3, 20), generator=g).to(device)
    labels = ids.clone()
    labels[0, :8], labels[1, :15], labels[2, 5:9] = -100, -100, -100
    kw = dict(kl_weight=0.05, num_items_in_batch=50)

    with torch.no_grad():
        ref_logits = reference(ids).logits
    loss, terms = token_loss("asft", policy(ids).logits, labels, ref_logits, **kw)
    loss.backward()
    expected = {k: p.grad.clone() for k, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    with torch.no_grad():
        ref_hidden = reference.model(ids).last_hidden_state
    hidden = policy.model(ids).last_hidden_state
    f_loss, f_terms = fused_token_loss(
        "asft", hidden, labels, lm_head_of(policy), ref_hidden, lm_head_of(reference), chunk_size=7, **kw
    )
    f_loss.backward()
    assert_close(f_loss.detach(), loss.detach(), 1e-5)
    assert f_terms == pytest.approx(terms, rel=1e-5)
    head_name = "model.embed_tokens.weight" if tie else "lm_head.weight"
    for name in (head_name, "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert_close(dict(policy.named_parameters())[name].grad, expected[name], 1e-4)


def test_lm_head_of_reads_scale_and_softcap_from_configs(tokenizer):
    from conftest import build_model

    model = build_model(tokenizer)
    head = lm_head_of(model)
    assert head.weight is model.lm_head.weight and head.bias is None
    assert (head.logit_scale, head.softcap) == (1.0, None)
    cfg = model.config
    for fields, expected in [
        (dict(logit_scale=0.0625), (0.0625, None)),  # Cohere
        (dict(logits_scaling=8.0), (0.125, None)),  # Granite divides
        (dict(lm_head_multiplier=0.5), (0.5, None)),  # Falcon-H1
        (dict(final_logit_softcapping=30.0), (1.0, 30.0)),  # Gemma-2
    ]:
        for k, v in fields.items():
            setattr(cfg, k, v)
        assert (lm_head_of(model).logit_scale, lm_head_of(model).softcap) == expected
        for k in fields:
            delattr(cfg, k)
    cfg.logits_scaling, cfg.model_type = 8.0, "hyperclovax"  # HyperCLOVA X multiplies
    assert lm_head_of(model).logit_scale == 8.0


def test_lm_head_of_through_peft(tokenizer):
    peft = pytest.importorskip("peft")
    from conftest import build_model

    model = build_model(tokenizer)
    lm_head_weight = model.lm_head.weight
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert lm_head_of(wrapped).weight is lm_head_weight
    on_head = peft.get_peft_model(build_model(tokenizer), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="lm_head"):
        lm_head_of(on_head)
