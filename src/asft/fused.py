"""The objectives of `asft.objectives`, computed chunk by chunk from last hidden states and the lm_head.

No [tokens x vocab] tensor of either model ever exists: only response rows reach the lm_head, `chunk_size` of
them at a time; each chunk's logit gradient is formed in closed form on the spot and pushed through the lm_head
at once (hidden rows, weight, bias), then the chunk's logits are dropped. The autograd Function's backward only
scales the stashed gradients by grad_output, as Liger Kernel's chunked losses do.

With pi = softmax(z), rho = the reference's softmax, w the detached token weight and k = kl_weight, the gradient
of one token's loss with respect to its logits z is

    w * CE_t                 w * (pi - onehot(y))
    k * KL(rho || pi)        k * (pi - rho)                           (forward, the default)
    k * KL(pi || rho)        k * pi * (log pi - log rho - KL_t)       (reverse)

then times the soft-cap's derivative 1 - (z/cap)^2 and the logit scale, and / N (`num_items_in_batch`).

With a cached reference (`objectives.CachedRows`: top-k set K, log rho on K, log rho_T of the tail) the KL is the
bucketed one of `objectives.bucketed_kl`, with pi_T = 1 - sum_K pi (a log-sum-exp over the complement), and

    forward  dKL_b/dz_j = pi_j - rho_j                    for j in K
                        = pi_j - rho_T * pi_j / pi_T      for j not in K   (the tail mass spread like pi)
    reverse  dKL_b/dz_j = pi_j * (L_j - KL_b),  L_j = log pi_j - log rho_j (j in K), log pi_T - log rho_T (else)
Softmax, log-sum-exp and KL math run in float32; matmuls run in the inputs' dtype (or autocast's).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .objectives import CachedRows, check_arguments, kl_over_buckets, select_response, token_weights, uses_kl


@dataclass(frozen=True)
class LMHead:
    """Everything that maps a last hidden state to logits."""

    weight: Tensor  # [V, H] (may be a tied embedding)
    bias: Tensor | None = None
    logit_scale: float = 1.0  # logits multiplied by this (Cohere logit_scale, Granite 1/logits_scaling, ...)
    softcap: float | None = None  # Gemma-2 final_logit_softcapping: cap * tanh(logits / cap), after the scale

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits, as the model's own forward forms them (the naive path; used by tests and benchmarks)."""
        return _finish(F.linear(hidden, self.weight, self.bias), self.logit_scale, self.softcap)


def lm_head_of(model) -> LMHead:
    """The LMHead of a causal LM (or a PeftModel around one), with the scale / soft-cap its config declares."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    module = model.get_output_embeddings()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(module, BaseTunerLayer) and module.active_adapters and not module.merged:
            # Its `weight` is the base weight alone: the adapter's delta would be silently dropped.
            raise NotImplementedError("the fused loss does not support an adapter on the lm_head; "
                                      "use loss_implementation='naive' or leave lm_head out of target_modules")
    except ImportError:
        pass
    # The same config fields TRL's add_fused_lm_head reads (trl/trainer/utils.py).
    cfg = model.config.get_text_config()
    scale = getattr(cfg, "logit_scale", None)  # Cohere; None on models that don't scale (MPT)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)  # Muse Glimmer
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies.
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(module.weight, getattr(module, "bias", None), 1.0 if scale is None else float(scale),
                  None if softcap is None else float(softcap))


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk math: pure elementwise / reduction functions of [c, V] float32 logits, so torch.compile can fuse them.


def _finish(a: Tensor, scale: float, cap: float | None) -> Tensor:
    if scale != 1.0:
        a = a * scale
    if cap is not None:
        a = torch.tanh(a / cap) * cap
    return a


def _policy_terms(a, y, scale: float, cap):
    """The policy's side of a chunk: finished logits z, their lse, log pi(y), pi, entropy and argmax hits."""
    z = _finish(a.float(), scale, cap)
    lse = torch.logsumexp(z, -1)
    logp_y = z.gather(1, y[:, None]).squeeze(1) - lse
    pi = torch.exp(z - lse[:, None])
    entropy = lse - (pi * z).sum(-1)
    hit = (z.argmax(-1) == y).float()
    return z, lse, logp_y, pi, entropy, hit


def _chunk_stats(a, ar, y, scale: float, cap, rscale: float, rcap, direction: str):
    """Per-token terms of a chunk from raw policy / reference logits (ar None without a reference).

    Returns (stats [5, c] = log pi(y), log rho(y), entropy, hit, kl; lse; ref lse). Entropy and KL use
    sum(p) = 1 to avoid materialising log pi: -sum pi log pi = lse - sum pi z.
    """
    z, lse, logp_y, pi, entropy, hit = _policy_terms(a, y, scale, cap)
    if ar is None:
        zero = torch.zeros_like(lse)
        return torch.stack([logp_y, zero, entropy, hit, zero]), lse, zero
    zr = _finish(ar.float(), rscale, rcap)
    lser = torch.logsumexp(zr, -1)
    logrho_y = zr.gather(1, y[:, None]).squeeze(1) - lser
    if direction == "forward":  # sum rho (log rho - log pi)
        kl = (torch.exp(zr - lser[:, None]) * (zr - z)).sum(-1) + (lse - lser)
    else:  # sum pi (log pi - log rho)
        kl = (pi * (z - zr)).sum(-1) + (lser - lse)
    return torch.stack([logp_y, logrho_y, entropy, hit, kl]), lse, lser


def _chunk_grad(a, ar, y, w, lse, lser, kl, k: float, scale: float, cap, rscale: float, rcap, direction: str, out):
    """Write d(sum_t w_t CE_t + k KL_t) / d(raw logits) of a chunk into `out` (ar None or k == 0: no KL), before / N.

    `out` may be `a` itself: each element is read before it is written, so compiled it costs no extra [c, V] buffer.
    """
    if ar is None or k == 0:
        return _dense_grad(a, y, w, w, lse, scale, cap, out)
    z = _finish(a.float(), scale, cap)
    pi = torch.exp(z - lse[:, None])
    zr = _finish(ar.float(), rscale, rcap)
    if direction == "forward":
        g = pi * (w + k)[:, None] - k * torch.exp(zr - lser[:, None])
    else:
        g = pi * (w[:, None] + k * (z - zr - (lse - lser + kl)[:, None]))
    _write_grad(g, z, y, w, scale, cap, out)


def _write_grad(g, z, y, w, scale: float, cap, out) -> None:
    """out = (g - w onehot(y)) * d(finished logits)/d(raw logits): the CE's label term, the soft-cap and the scale."""
    # A compare with an iota rather than a scatter: stays one elementwise pass once compiled.
    is_label = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]
    g = g - torch.where(is_label, w[:, None], 0.0)
    if cap is not None:
        g = g * (1 - (z / cap) ** 2)
    out.copy_(g * scale if scale != 1.0 else g)


def _masked_lse(a, scale: float, cap):
    """log-sum-exp of the finished logits, entries where the raw logits are -inf left out (the cached path's
    complement: the caller writes -inf over the top-k in place, so no masked [c, V] copy is ever made)."""
    z = _finish(a.float(), scale, cap)
    return torch.where(a == float("-inf"), float("-inf"), z).logsumexp(-1)


def _dense_grad(a, y, coef, w, lse, scale: float, cap, out):
    """out = d/d(raw logits) of a chunk's gradient pi * coef - w onehot(y): the whole gradient without a KL
    (coef = w), and every vocabulary entry's share of the cached one (`_cached_grad` adds the top-k's after)."""
    z = _finish(a.float(), scale, cap)
    _write_grad(torch.exp(z - lse[:, None]) * coef[:, None], z, y, w, scale, cap, out)


def _cached_stats(a, y, c: CachedRows, scale: float, cap, direction: str):
    """`_chunk_stats` against a cached reference: the bucketed KL (objectives.kl_over_buckets) instead of the full
    one. Also returns log pi_T (the policy's log tail mass), which the gradient needs.

    The tail's log-sum-exp runs over `a` itself with -inf written over the top-k entries, which are put back
    after (bit for bit): `a` leaves as it came, and no [c, V] buffer beyond the logits' own is needed.
    """
    stats, lse, _ = KERNELS.call(0, a, None, y, scale, cap, 1.0, None, direction)
    a_k = a.gather(1, c.ids)
    logp_k = _finish(a_k.float(), scale, cap) - lse[:, None]
    logpi_t = None
    if c.ids.shape[1] < a.shape[1]:
        a.scatter_(1, c.ids, float("-inf"))
        try:
            logpi_t = KERNELS.call(2, a, scale, cap) - lse
        finally:
            a.scatter_(1, c.ids, a_k)
    stats[1], stats[4] = c.label, kl_over_buckets(logp_k, logpi_t, c.logp, c.tail, direction)
    return stats, lse, torch.full_like(lse, float("-inf")) if logpi_t is None else logpi_t


def _cached_grad(a, y, w, lse, logpi_t, kl, c: CachedRows, k: float, scale: float, cap, direction: str, out):
    """`_chunk_grad` against a cached reference: the closed-form gradient of the bucketed KL (module docstring),
    as a dense part for every entry (one pass into `out`, which may be `a`) plus a correction on the top-k."""
    z_k = _finish(a.gather(1, c.ids).float(), scale, cap)  # before `out` overwrites `a`
    pi_k = torch.exp(z_k - lse[:, None])
    has_tail = c.ids.shape[1] < a.shape[1]
    if direction == "forward":
        # Every j: pi_j (w + k) - k rho_T pi_j / pi_T; then on K: + k rho_T pi_j / pi_T - k rho_j.
        ratio = torch.where(c.tail > float("-inf"), torch.exp(c.tail - logpi_t), 0.0) if has_tail else \
            torch.zeros_like(lse)
        coef = w + k - k * ratio
        fix = k * (pi_k * ratio[:, None] - c.logp.exp())
    else:
        # Every j: pi_j (w + k (L_T - KL)); then on K: + k pi_j (L_j - L_T). L_T is 0 when there is no tail.
        l_t = logpi_t - c.tail if has_tail else torch.zeros_like(lse)
        coef = w + k * (l_t - kl)
        fix = k * pi_k * (z_k - lse[:, None] - c.logp - l_t[:, None])
    KERNELS.call(3, a, y, coef, w, lse, scale, cap, out)
    if cap is not None:
        fix = fix * (1 - (z_k / cap) ** 2)
    out.scatter_add_(1, c.ids, fix * scale if scale != 1.0 else fix)


# Compile only chunks this big (elements of [c, V]): the fused kernels are ~6x faster than eager on CPU there, while
# small chunks (tiny test models, a last chunk of a few tokens) would pay compilation and per-call overhead for nothing.
COMPILE_MIN_ELEMENTS = 1 << 22


class _Kernels:
    """The chunk functions, through torch.compile where it works (ASFT_COMPILE=0 turns it off), else eager."""

    FUNCTIONS = (_chunk_stats, _chunk_grad, _masked_lse, _dense_grad)

    def __init__(self):
        self.compiled = None  # None: not tried yet; False: eager for good

    def call(self, i: int, a: Tensor, *args):
        eager = self.FUNCTIONS[i]
        if self.compiled is None:
            self.compiled = os.environ.get("ASFT_COMPILE", "1") != "0" and tuple(
                torch.compile(f, dynamic=None) for f in self.FUNCTIONS)
        if not self.compiled or a.numel() < COMPILE_MIN_ELEMENTS:
            return eager(a, *args)
        try:
            return self.compiled[i](a, *args)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, no triton, ...: the same math runs eager
            warnings.warn(f"asft.fused: torch.compile failed ({type(e).__name__}: {e}); running eager")
            self.compiled = False
            return eager(a, *args)


KERNELS = _Kernels()


# ----------------------------------------------------------------------------------------------------------------
# The chunk loop.


def _groups(rows: Tensor, n: int, chunk_size: int, whole_sequences: bool) -> list[list[tuple[int, int]]]:
    """Chunks as (start, end), in groups whose weights must all be known before any gradient of the group.

    Only iw-SFT's sequence weights need that (`whole_sequences`): short sequences are packed whole into one chunk
    (one pass), a sequence longer than a chunk is its own group (a first pass for its weight, then the gradient).
    """
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    if not whole_sequences or n == 0:
        return [[s] for s in spans]
    bounds = ((rows[1:] != rows[:-1]).nonzero().squeeze(1) + 1).tolist()
    if len(bounds) + 1 != rows.unique().numel():  # a sequence's tokens are not contiguous: everything first
        return [spans]
    groups, cur = [], None
    for a, b in zip([0] + bounds, bounds + [n]):
        if cur is not None and b - cur[0] <= chunk_size:
            cur = (cur[0], b)
            continue
        if cur is not None:
            groups.append([cur])
        cur = None
        if b - a > chunk_size:
            groups.append([(s, min(s + chunk_size, b)) for s in range(a, b, chunk_size)])
        else:
            cur = (a, b)
    return groups + ([[cur]] if cur is not None else [])


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _run(mode, h, w_head, b_head, rh, rw_head, rb_head, y, rows, opt, cached=None):
    """Loss sum, per-token stats [6, n] (the _chunk_stats rows + weight) and the gradients (None where not needed)."""
    n, k, direction = y.numel(), opt["kl_weight"], opt["kl_direction"]
    scale, cap, rscale, rcap = opt["scale"], opt["cap"], opt["rscale"], opt["rcap"]
    kl_in_grad = uses_kl(mode)
    dtype = _compute_dtype(h)
    W, b = w_head.to(dtype), None if b_head is None else b_head.to(dtype)
    hc = h.detach().to(dtype)
    if rh is not None:
        rdtype = _compute_dtype(rh)
        # LoRA: the reference shares the policy's weight; don't cast it twice under autocast.
        RW = W if rw_head.data_ptr() == w_head.data_ptr() and rdtype == dtype else rw_head.to(rdtype)
        Rb = None if rb_head is None else rb_head.to(rdtype)
        rhc = rh.to(rdtype)
    need_h, need_w = h.requires_grad, w_head.requires_grad
    need_b = b_head is not None and b_head.requires_grad
    # Accumulate the weight/bias gradients in float32 whatever their dtype; returned in theirs. Every row of gh is
    # written by its chunk, and gw by the first chunk (s == 0) with beta=0: no zero-fill pass over a [V, H] buffer
    # unless no chunk runs.
    gh = torch.empty_like(h) if need_h else None
    gw = (torch.empty if n else torch.zeros)(w_head.shape, dtype=torch.float32, device=h.device) if need_w else None
    gb = torch.zeros(b_head.shape, dtype=torch.float32, device=h.device) if need_b else None
    stats = torch.zeros(6, n, dtype=torch.float32, device=h.device)
    lses = torch.zeros(2, n, dtype=torch.float32, device=h.device)
    inv_n = 1.0 / opt["denom"]

    # One logits buffer per model, reused by every chunk (fresh [c, V] allocations cost page faults on CPU); the
    # policy's also receives the chunk's logit gradient in place when it is float32.
    rows_max = min(opt["chunk_size"], n)
    buf = torch.empty(rows_max, W.shape[0], dtype=dtype, device=h.device)
    rbuf = None if rh is None else torch.empty(rows_max, RW.shape[0], dtype=rdtype, device=h.device)
    gbuf = buf if dtype == torch.float32 else torch.empty(rows_max, W.shape[0], device=h.device)

    def logits(s, e, ref=False):
        x, weight, bias, out = (rhc, RW, Rb, rbuf) if ref else (hc, W, b, buf)
        out = out[: e - s]
        if bias is None:
            return torch.mm(x[s:e], weight.t(), out=out)
        return torch.addmm(bias, x[s:e], weight.t(), out=out)

    def weights(s, e):
        return token_weights(mode, stats[0, s:e], stats[1, s:e], rows[s:e],
                             iw_max=opt["iw_max"], iw_level=opt["iw_level"])

    def chunk_stats(s, e, a, ar):
        if cached is not None:  # lses[1] holds log pi_T here, what the cached gradient needs
            stats[:5, s:e], lses[0, s:e], lses[1, s:e] = _cached_stats(a, y[s:e], cached[s:e], scale, cap, direction)
        else:
            stats[:5, s:e], lses[0, s:e], lses[1, s:e] = KERNELS.call(
                0, a, ar, y[s:e], scale, cap, rscale, rcap, direction)

    def chunk_grad(s, e, a, ar, g):
        if cached is not None and kl_in_grad:
            _cached_grad(a, y[s:e], stats[5, s:e], lses[0, s:e], lses[1, s:e], stats[4, s:e], cached[s:e], k, scale,
                         cap, direction, g)
        else:
            KERNELS.call(1, a, ar if kl_in_grad else None, y[s:e], stats[5, s:e], lses[0, s:e], lses[1, s:e],
                         stats[4, s:e], k, scale, cap, rscale, rcap, direction, g)

    by_seq = mode == "iw_sft" and opt["iw_level"] == "sequence"
    for group in _groups(rows, n, opt["chunk_size"], by_seq):
        two_pass = len(group) > 1
        if two_pass:  # iw-SFT, a sequence longer than a chunk: its weight first
            for s, e in group:
                chunk_stats(s, e, logits(s, e), logits(s, e, True) if rh is not None else None)
            gs, ge = group[0][0], group[-1][1]
            stats[5, gs:ge] = weights(gs, ge)
        for s, e in group:
            a = logits(s, e)
            ar = logits(s, e, True) if rh is not None and (kl_in_grad or not two_pass) else None
            if not two_pass:
                chunk_stats(s, e, a, ar)
                stats[5, s:e] = weights(s, e)
            if not (need_h or need_w or need_b):
                continue
            g = gbuf[: e - s]
            chunk_grad(s, e, a, ar, g)
            if need_h:
                gh[s:e] = (g.to(dtype) @ W).mul_(inv_n)
            if need_w:  # float32 from the float32 logit gradient: exact accumulation in any input dtype
                gw.addmm_(g.t(), hc[s:e].float(), beta=float(s > 0), alpha=inv_n)
            if need_b:
                gb.add_(g.sum(0), alpha=inv_n)
    per_token = stats[5] * -stats[0] + (k * stats[4] if kl_in_grad else 0.0)
    if gw is not None:
        gw = gw.to(w_head.dtype)
    if gb is not None:
        gb = gb.to(b_head.dtype)
    return per_token.sum() * inv_n, stats, gh, gw, gb


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ref_h, ref_weight, ref_bias, y, rows, mode, opt, cached):
        loss, stats, gh, gw, gb = _run(mode, h, weight, bias, ref_h, ref_weight, ref_bias, y, rows, opt, cached)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        gh, gw, gb = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            # In place, as Liger does: a second [V, H] buffer would cost as much as the weight gradient itself.
            gh, gw, gb = (None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in (gh, gw, gb))
        return gh, gw, gb, None, None, None, None, None, None, None, None


def fused_loss_selected(
    mode: str,
    hidden: Tensor,
    targets: Tensor,
    rows: Tensor,
    head: LMHead,
    ref_hidden: Tensor | None = None,
    ref_head: LMHead | None = None,
    *,
    kl_weight: float = 0.03,
    kl_direction: str = "forward",
    iw_max: float = 16.0,
    iw_level: str = "sequence",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int = 1024,
    ref_cache: CachedRows | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of `mode` on already-selected response rows: hidden [n, H] predicting targets [n], rows [n] the
    batch row of each (iw-SFT's sequences). `ref_head` defaults to `head` (LoRA: the same weight, adapters off).
    `ref_cache` (instead of ref_hidden): a cached reference for these n tokens; the KL is then the bucketed one."""
    if ref_hidden is not None and ref_cache is not None:
        raise ValueError("give ref_hidden or ref_cache, not both")
    mode = check_arguments(mode, ref_hidden is not None or ref_cache is not None, kl_weight, kl_direction, iw_max)
    if ref_cache is not None:
        if len(ref_cache) != targets.numel():
            raise ValueError(f"ref_cache holds {len(ref_cache)} tokens, the batch {targets.numel()} response tokens")
        ref_cache = ref_cache.to(hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    ref_head = ref_head or head
    n = targets.numel()
    denom = n if num_items_in_batch is None else num_items_in_batch
    opt = dict(kl_weight=float(kl_weight), kl_direction=kl_direction, iw_max=float(iw_max), iw_level=iw_level,
               chunk_size=int(chunk_size), denom=max(float(denom), 1.0), scale=float(head.logit_scale),
               cap=head.softcap, rscale=float(ref_head.logit_scale), rcap=ref_head.softcap)
    ref_args = (None, None, None)
    if ref_hidden is not None:  # the reference never receives gradients
        ref_args = (ref_hidden.detach(), ref_head.weight.detach(),
                    None if ref_head.bias is None else ref_head.bias.detach())
    loss, stats = _FusedLoss.apply(hidden, head.weight, head.bias, *ref_args, targets, rows, mode, opt, ref_cache)
    if n == 0:
        return loss, {"num_tokens": 0.0}
    logp_y, _, entropy, hit, kl, weight = stats
    metrics = {
        "nll": -logp_y.mean(),
        "weighted_nll": (weight * -logp_y).mean(),
        "mean_prob": logp_y.exp().mean(),
        "mean_weight": weight.mean(),
        "entropy": entropy.mean(),
        "token_accuracy": hit.mean(),
    }
    if ref_hidden is not None or ref_cache is not None:
        metrics["kl"] = kl.mean()
    metrics = {key: float(v) for key, v in metrics.items()}
    metrics["num_tokens"] = float(n)
    return loss, metrics


def fused_token_loss(
    mode: str,
    hidden: Tensor,
    labels: Tensor,
    head: LMHead,
    ref_hidden: Tensor | None = None,
    ref_head: LMHead | None = None,
    *,
    kl_weight: float = 0.03,
    kl_direction: str = "forward",
    iw_max: float = 16.0,
    iw_level: str = "sequence",
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    ref_cache: CachedRows | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`objectives.token_loss` from last hidden states [B, T, H] and unshifted labels [B, T]: same loss, same
    metrics, same reduction; no [tokens x vocab] tensor. Masked positions never reach the lm_head."""
    h, y, rows = select_response(hidden, labels, ignore_index)
    ref_h = None if ref_hidden is None else select_response(ref_hidden, labels, ignore_index)[0]
    return fused_loss_selected(mode, h, y, rows, head, ref_h, ref_head, kl_weight=kl_weight,
                               kl_direction=kl_direction, iw_max=iw_max, iw_level=iw_level,
                               num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, ref_cache=ref_cache)
