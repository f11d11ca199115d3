"""The objectives of `asft.objectives`, computed chunk by chunk from last hidden states and the lm_head.

No [tokens x vocab] tensor of either model ever exists: only response rows reach the lm_head, `chunk_size` of
them at a time; each chunk's logit gradient is formed in closed form on the spot and pushed through the lm_head
at once (hidden rows, weight, bias), then the chunk's logits are dropped. The autograd Function's backward only
scales the stashed gradients by grad_output, as Liger Kernel's chunked losses do.

With pi = softmax(z), rho = the reference's softmax, w the detached token weight and k = kl_weight, the gradient
of one token's loss with respect to its logits z is (whatever the weight rule: w is a constant to it)

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

Layout, as Liger Kernel's chunked_loss/: `_Chunks` owns the chunking (logits buffers, the loop, the gradient pushed
through the lm_head); a reference source chosen once per call (`_NoReference`, `_OnlineReference`,
`_CachedReference`) defines only one chunk's stats and logit gradient; the token weight w is a step of its own
between the two (`_Settings.weights`: `objectives.token_weights`, the rules of `objectives.WEIGHT_RULES` unchanged),
which the gradients take as given. A rule that reads the policy's top-k entropy (EAFT) gets it from the chunk's
logits in the stats pass.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .objectives import (
    CachedRows,
    ObjectiveSettings,
    TokenStats,
    check_reference,
    kl_over_buckets,
    select_response,
    settings_of,
    token_metrics,
    token_weights,
    topk_entropy,
)


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
            raise NotImplementedError(
                "the fused loss does not support an adapter on the lm_head; "
                "use loss_implementation='naive' or leave lm_head out of target_modules"
            )
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
    return LMHead(
        module.weight,
        getattr(module, "bias", None),
        1.0 if scale is None else float(scale),
        None if softcap is None else float(softcap),
    )


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


def _chunk_stats(a, ar, y, scale: float, cap, rscale: float, rcap, direction: str, topk: int):
    """Per-token terms of a chunk from raw policy / reference logits (ar None without a reference).

    Returns (stats [6, c] = log pi(y), log rho(y), entropy, hit, kl, top-k entropy (topk 0: zeros); lse; ref lse).
    Entropy and KL use sum(p) = 1 to avoid materialising log pi: -sum pi log pi = lse - sum pi z.
    """
    z, lse, logp_y, pi, entropy, hit = _policy_terms(a, y, scale, cap)
    zero = torch.zeros_like(lse)
    entropy_k = topk_entropy(z, topk) if topk else zero
    if ar is None:
        return torch.stack([logp_y, zero, entropy, hit, zero, entropy_k]), lse, zero
    zr = _finish(ar.float(), rscale, rcap)
    lser = torch.logsumexp(zr, -1)
    logrho_y = zr.gather(1, y[:, None]).squeeze(1) - lser
    if direction == "forward":  # sum rho (log rho - log pi)
        kl = (torch.exp(zr - lser[:, None]) * (zr - z)).sum(-1) + (lse - lser)
    else:  # sum pi (log pi - log rho)
        kl = (pi * (z - zr)).sum(-1) + (lser - lse)
    return torch.stack([logp_y, logrho_y, entropy, hit, kl, entropy_k]), lse, lser


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
    (coef = w), and every vocabulary entry's share of the cached one (`_CachedReference.grad` adds the top-k's
    after)."""
    z = _finish(a.float(), scale, cap)
    _write_grad(torch.exp(z - lse[:, None]) * coef[:, None], z, y, w, scale, cap, out)


# Compile only chunks this big (elements of [c, V]): the fused kernels are ~6x faster than eager on CPU there, while
# small chunks (tiny test models, a last chunk of a few tokens) would pay compilation and per-call overhead for nothing.
COMPILE_MIN_ELEMENTS = 1 << 22


class _Kernels:
    """The compile state every chunk kernel shares: one decision (ASFT_COMPILE=0 turns torch.compile off) and one
    fallback (a failure in any kernel turns them all eager for good, with a single warning)."""

    def __init__(self):
        self.compiled = None  # None: not decided yet; False: eager for good; else {function: its compiled form}

    def run(self, fn, a: Tensor, *args):
        if self.compiled is None:
            self.compiled = {} if os.environ.get("ASFT_COMPILE", "1") != "0" else False
        if self.compiled is False or a.numel() < COMPILE_MIN_ELEMENTS:
            return fn(a, *args)
        try:
            if fn not in self.compiled:
                self.compiled[fn] = torch.compile(fn, dynamic=None)
            return self.compiled[fn](a, *args)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, no triton, ...: the same math runs eager
            warnings.warn(f"asft.fused: torch.compile failed ({type(e).__name__}: {e}); running eager", stacklevel=2)
            self.compiled = False
            return fn(a, *args)


KERNELS = _Kernels()


class _Kernel:
    """A chunk function called by name, through `KERNELS` (looked up per call: tests swap it)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, a: Tensor, *args):
        return KERNELS.run(self.fn, a, *args)


STATS = _Kernel(_chunk_stats)
GRAD = _Kernel(_chunk_grad)
TAIL_LSE = _Kernel(_masked_lse)
DENSE_GRAD = _Kernel(_dense_grad)


# ----------------------------------------------------------------------------------------------------------------
# Settings and reference sources: each source defines only the math of one chunk, the loop below owns the chunking.

# The rows of the per-token stats [7, n]: the `_chunk_stats` rows, then the token weight.
LOGP, LOGRHO, ENTROPY, HIT, KL, ENTROPY_K, WEIGHT = range(7)


@dataclass(frozen=True)
class _Settings:
    """Everything of one call but its tensors, fixed once by `fused_loss_selected`."""

    objective: ObjectiveSettings  # the rule, its parameters and the anchor
    chunk_size: int
    denom: float  # the loss is a sum over tokens / denom (num_items_in_batch, or n; at least 1)
    scale: float  # the policy head's logit scale and soft-cap
    cap: float | None
    ref_scale: float  # the reference head's
    ref_cap: float | None

    @property
    def kl_weight(self) -> float:
        return float(self.objective.kl_weight)

    @property
    def kl_direction(self) -> str:
        return self.objective.kl_direction

    @property
    def topk(self) -> int:
        return self.objective.topk  # EAFT's k; 0 when the rule reads no top-k entropy

    @property
    def kl_in_loss(self) -> bool:
        return self.objective.anchored  # iw-SFT / PriFT read log rho(y) for their weights, with or without a KL

    @property
    def whole_sequences(self) -> bool:
        return self.objective.whole_sequences  # a weight per sequence

    def weights(self, logp_y: Tensor, logrho_y: Tensor, rows: Tensor, entropy_k: Tensor) -> Tensor:
        """The detached weight w_t of each token's CE. The gradients below take it as given, whatever its rule."""
        return token_weights(self.objective, TokenStats(logp_y, logrho_y, rows, entropy_k))


class _NoReference:
    """No reference model. Also the base of the two sources that have one: `chunk` gives what a chunk's math needs
    of the reference (here nothing), `stats` that chunk's per-token terms and `grad` its logit gradient. The
    kernels take ar None as "no reference", which the online source also passes to `grad` without a KL term."""

    def __init__(self, cfg: _Settings):
        self.cfg = cfg

    def chunk(self, s: int, e: int):
        return None

    def stats(self, a, ar, y):
        """(stats [6, c]: the `_chunk_stats` rows, the policy's lse, the reference's lse) of raw logits a."""
        c = self.cfg
        return STATS(a, ar, y, c.scale, c.cap, c.ref_scale, c.ref_cap, c.kl_direction, c.topk)

    def grad(self, a, ar, y, st, ls, out) -> None:
        """Write the chunk's logit gradient into `out` from its stats st [7, c] and lses ls [2, c] (`_Chunks`)."""
        c = self.cfg
        GRAD(
            a,
            ar,
            y,
            st[WEIGHT],
            ls[0],
            ls[1],
            st[KL],
            c.kl_weight,
            c.scale,
            c.cap,
            c.ref_scale,
            c.ref_cap,
            c.kl_direction,
            out,
        )


class _OnlineReference(_NoReference):
    """The reference's last hidden states through its lm_head: its logits, chunk by chunk like the policy's."""

    def __init__(self, cfg: _Settings, head: _HeadRows):
        super().__init__(cfg)
        self.head = head

    def chunk(self, s: int, e: int):
        return self.head.logits(s, e)


class _CachedReference(_NoReference):
    """A cached reference (`CachedRows`): log rho(y) from the cache and the bucketed KL (module docstring). Its lses
    row 1 holds log pi_T, the policy's log tail mass, which the gradient needs, instead of a reference lse."""

    def __init__(self, cfg: _Settings, cache: CachedRows):
        super().__init__(cfg)
        self.cache = cache

    def chunk(self, s: int, e: int) -> CachedRows:
        return self.cache[s:e]

    def stats(self, a, c: CachedRows, y):
        """The tail's log-sum-exp runs over `a` itself with -inf written over the top-k entries, which are put back
        after (bit for bit): `a` leaves as it came, and no [c, V] buffer beyond the logits' own is needed."""
        scale, cap = self.cfg.scale, self.cfg.cap
        stats, lse, _ = super().stats(a, None, y)
        a_k = a.gather(1, c.ids)
        logp_k = _finish(a_k.float(), scale, cap) - lse[:, None]
        logpi_t = None
        if c.ids.shape[1] < a.shape[1]:
            a.scatter_(1, c.ids, float("-inf"))
            try:
                logpi_t = TAIL_LSE(a, scale, cap) - lse
            finally:
                a.scatter_(1, c.ids, a_k)
        stats[LOGRHO], stats[KL] = c.label, kl_over_buckets(logp_k, logpi_t, c.logp, c.tail, self.cfg.kl_direction)
        return stats, lse, torch.full_like(lse, float("-inf")) if logpi_t is None else logpi_t

    def grad(self, a, c: CachedRows | None, y, st, ls, out) -> None:
        """The closed-form gradient of w CE + k KL_b (module docstring), as a dense part for every entry (one pass
        into `out`, which may be `a`) plus a correction on the top-k. c None: no KL term, the CE's alone."""
        if c is None:
            return super().grad(a, None, y, st, ls, out)
        scale, cap = self.cfg.scale, self.cfg.cap
        z_k = _finish(a.gather(1, c.ids).float(), scale, cap)  # before `out` overwrites `a`
        coef, fix = self._coefficients(z_k, c, st, ls, c.ids.shape[1] < a.shape[1])
        DENSE_GRAD(a, y, coef, st[WEIGHT], ls[0], scale, cap, out)
        if cap is not None:
            fix = fix * (1 - (z_k / cap) ** 2)
        out.scatter_add_(1, c.ids, fix * scale if scale != 1.0 else fix)

    def _coefficients(self, z_k, c: CachedRows, st, ls, has_tail: bool):
        """(coef [c]: every entry's gradient is pi_j * coef, fix [c, k]: what the top-k entries add to theirs)."""
        k, w, kl, (lse, logpi_t) = self.cfg.kl_weight, st[WEIGHT], st[KL], ls
        pi_k = torch.exp(z_k - lse[:, None])
        if self.cfg.kl_direction == "forward":
            # Every j: pi_j (w + k) - k rho_T pi_j / pi_T; then on K: + k rho_T pi_j / pi_T - k rho_j.
            ratio = (
                torch.where(c.tail > float("-inf"), torch.exp(c.tail - logpi_t), 0.0)
                if has_tail
                else torch.zeros_like(lse)
            )
            return w + k - k * ratio, k * (pi_k * ratio[:, None] - c.logp.exp())
        # Every j: pi_j (w + k (L_T - KL)); then on K: + k pi_j (L_j - L_T). L_T is 0 when there is no tail.
        l_t = logpi_t - c.tail if has_tail else torch.zeros_like(lse)
        return w + k * (l_t - kl), k * pi_k * (z_k - lse[:, None] - c.logp - l_t[:, None])


def _reference(cfg: _Settings, policy: _HeadRows, weight: Tensor, ref_h, ref_weight, ref_bias, cached):
    """The reference source of a call, chosen once."""
    if cached is not None:
        return _CachedReference(cfg, cached)
    if ref_h is None:
        return _NoReference(cfg)
    # LoRA: the reference shares the policy's weight; don't cast it twice under autocast.
    shared = ref_weight.data_ptr() == weight.data_ptr() and _compute_dtype(ref_h) == policy.dtype
    return _OnlineReference(
        cfg, _HeadRows(ref_h, ref_weight, ref_bias, policy.buf.shape[0], policy.weight if shared else None)
    )


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


class _HeadRows:
    """Hidden rows [n, H] and an lm_head, in the compute dtype, with one logits buffer that every chunk reuses
    (fresh [c, V] allocations cost page faults on CPU). `weight_cast`: the weight already in that dtype."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, rows_max: int, weight_cast=None):
        self.dtype = _compute_dtype(x)
        self.weight = weight.to(self.dtype) if weight_cast is None else weight_cast
        self.bias = None if bias is None else bias.to(self.dtype)
        self.x = x.detach().to(self.dtype)
        self.buf = torch.empty(rows_max, self.weight.shape[0], dtype=self.dtype, device=x.device)

    def logits(self, s: int, e: int) -> Tensor:
        out = self.buf[: e - s]
        if self.bias is None:
            return torch.mm(self.x[s:e], self.weight.t(), out=out)
        return torch.addmm(self.bias, self.x[s:e], self.weight.t(), out=out)


class _Grads:
    """The gradients of the hidden rows, the lm_head weight and bias (None where not needed), chunk by chunk.

    The weight's and bias's accumulate in float32 whatever their dtype; returned in theirs. Every row of the hidden
    gradient is written by its chunk, and the weight's by the first chunk (s == 0) with beta=0: no zero-fill pass
    over a [V, H] buffer unless no chunk runs.
    """

    def __init__(self, h: Tensor, weight: Tensor, bias: Tensor | None, n: int, inv_n: float):
        dev = h.device
        self.h = torch.empty_like(h) if h.requires_grad else None
        self.w = (
            (torch.empty if n else torch.zeros)(weight.shape, dtype=torch.float32, device=dev)
            if weight.requires_grad
            else None
        )
        self.b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=dev)
            if bias is not None and bias.requires_grad
            else None
        )
        self.dtypes, self.inv_n = (weight.dtype, None if bias is None else bias.dtype), inv_n

    @property
    def needed(self) -> bool:
        return self.h is not None or self.w is not None or self.b is not None

    def add(self, s: int, e: int, g: Tensor, policy: _HeadRows) -> None:
        """Push the logit gradient g [c, V] (float32) of chunk s:e through the lm_head, times 1 / denom."""
        if self.h is not None:
            self.h[s:e] = (g.to(policy.dtype) @ policy.weight).mul_(self.inv_n)
        if self.w is not None:  # float32 from the float32 logit gradient: exact accumulation in any input dtype
            self.w.addmm_(g.t(), policy.x[s:e].float(), beta=float(s > 0), alpha=self.inv_n)
        if self.b is not None:
            self.b.add_(g.sum(0), alpha=self.inv_n)

    def result(self):
        w, b = self.w, self.b
        return self.h, None if w is None else w.to(self.dtypes[0]), None if b is None else b.to(self.dtypes[1])


class _Chunks:
    """The chunking shared by every reference source: per-token stats and weights of all n tokens, and the
    gradients, from the policy's logits and the source's per-chunk math."""

    def __init__(self, cfg: _Settings, policy: _HeadRows, source: _NoReference, grads: _Grads, y: Tensor, rows):
        n, dev = y.numel(), policy.x.device
        self.cfg, self.policy, self.source, self.grads, self.y, self.rows = cfg, policy, source, grads, y, rows
        self.stats = torch.zeros(WEIGHT + 1, n, dtype=torch.float32, device=dev)  # rows LOGP ... WEIGHT
        self.lses = torch.zeros(2, n, dtype=torch.float32, device=dev)  # the policy's lse; the source's (`stats`)
        # The chunk's logit gradient, in float32: in place over the policy's logits when they are float32 already.
        buf = policy.buf
        self.gbuf = buf if policy.dtype == torch.float32 else torch.empty(buf.shape[0], buf.shape[1], device=dev)

    def run(self) -> None:
        for group in _groups(self.rows, self.y.numel(), self.cfg.chunk_size, self.cfg.whole_sequences):
            single = len(group) == 1
            if not single:  # iw-SFT, a sequence longer than a chunk: its weight first
                for s, e in group:
                    self.measure(s, e, self.policy.logits(s, e), self.source.chunk(s, e))
                self.weigh(group[0][0], group[-1][1])
            for s, e in group:
                a = self.policy.logits(s, e)
                # A two-pass group is weighed already: there only a KL term needs the reference again.
                ref = self.source.chunk(s, e) if single or self.cfg.kl_in_loss else None
                if single:
                    self.measure(s, e, a, ref)
                    self.weigh(s, e)
                if self.grads.needed:
                    self.backward(s, e, a, ref)

    def measure(self, s: int, e: int, a: Tensor, ref) -> None:
        self.stats[:WEIGHT, s:e], self.lses[0, s:e], self.lses[1, s:e] = self.source.stats(a, ref, self.y[s:e])

    def weigh(self, s: int, e: int) -> None:
        st = self.stats
        st[WEIGHT, s:e] = self.cfg.weights(st[LOGP, s:e], st[LOGRHO, s:e], self.rows[s:e], st[ENTROPY_K, s:e])

    def backward(self, s: int, e: int, a: Tensor, ref) -> None:
        g = self.gbuf[: e - s]
        ref = ref if self.cfg.kl_in_loss else None  # without a KL term the gradient is the weighted CE's alone
        self.source.grad(a, ref, self.y[s:e], self.stats[:, s:e], self.lses[:, s:e], g)
        self.grads.add(s, e, g, self.policy)

    def loss(self) -> Tensor:
        st, cfg = self.stats, self.cfg
        per_token = st[WEIGHT] * -st[LOGP] + (cfg.kl_weight * st[KL] if cfg.kl_in_loss else 0.0)
        return per_token.sum() * (1.0 / cfg.denom)


def _run(cfg: _Settings, h, weight, bias, y, rows, ref_h, ref_weight, ref_bias, cached):
    """Loss sum / denom, per-token stats [7, n] (the _chunk_stats rows + weight) and the gradients of h, weight
    and bias (None where not needed)."""
    n = y.numel()
    policy = _HeadRows(h, weight, bias, min(cfg.chunk_size, n))
    source = _reference(cfg, policy, weight, ref_h, ref_weight, ref_bias, cached)
    grads = _Grads(h, weight, bias, n, 1.0 / cfg.denom)
    chunks = _Chunks(cfg, policy, source, grads, y, rows)
    chunks.run()
    return chunks.loss(), chunks.stats, *grads.result()


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ref_h, ref_weight, ref_bias, y, rows, cfg, cached):
        loss, stats, gh, gw, gb = _run(cfg, h, weight, bias, y, rows, ref_h, ref_weight, ref_bias, cached)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        gh, gw, gb = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            # In place, as Liger does: a second [V, H] buffer would cost as much as the weight gradient itself.
            gh, gw, gb = (None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in (gh, gw, gb))
        return gh, gw, gb, None, None, None, None, None, None, None


def fused_loss_selected(
    mode: str,
    hidden: Tensor,
    targets: Tensor,
    rows: Tensor,
    head: LMHead,
    ref_hidden: Tensor | None = None,
    ref_head: LMHead | None = None,
    *,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int = 1024,
    ref_cache: CachedRows | None = None,
    **objective,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of `mode` on already-selected response rows: hidden [n, H] predicting targets [n], rows [n] the
    batch row of each (iw-SFT's sequences). `ref_head` defaults to `head` (LoRA: the same weight, adapters off).
    `ref_cache` (instead of ref_hidden): a cached reference for these n tokens; the KL is then the bucketed one.
    `mode` and `objective`: as `objectives.token_loss` (a mode name and ObjectiveSettings fields, or settings)."""
    if ref_hidden is not None and ref_cache is not None:
        raise ValueError("give ref_hidden or ref_cache, not both")
    settings = settings_of(mode, **objective)
    check_reference(settings, ref_hidden is not None or ref_cache is not None)
    if ref_cache is not None:
        if len(ref_cache) != targets.numel():
            raise ValueError(f"ref_cache holds {len(ref_cache)} tokens, the batch {targets.numel()} response tokens")
        ref_cache = ref_cache.to(hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    ref_head = ref_head or head
    n = targets.numel()
    denom = n if num_items_in_batch is None else num_items_in_batch
    cfg = _Settings(
        objective=settings,
        chunk_size=int(chunk_size),
        denom=max(float(denom), 1.0),
        scale=float(head.logit_scale),
        cap=head.softcap,
        ref_scale=float(ref_head.logit_scale),
        ref_cap=ref_head.softcap,
    )
    ref_args = (None, None, None)
    if ref_hidden is not None:  # the reference never receives gradients
        ref_args = (
            ref_hidden.detach(),
            ref_head.weight.detach(),
            None if ref_head.bias is None else ref_head.bias.detach(),
        )
    loss, stats = _FusedLoss.apply(hidden, head.weight, head.bias, *ref_args, targets, rows, cfg, ref_cache)
    if n == 0:
        return loss, {"num_tokens": 0.0}
    logp_y, _, entropy, hit, kl, _, weight = stats
    has_reference = ref_hidden is not None or ref_cache is not None
    return loss, token_metrics(logp_y, weight, entropy, hit, kl if has_reference else None)


def fused_token_loss(
    mode: str,
    hidden: Tensor,
    labels: Tensor,
    head: LMHead,
    ref_hidden: Tensor | None = None,
    ref_head: LMHead | None = None,
    *,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    ref_cache: CachedRows | None = None,
    **objective,
) -> tuple[Tensor, dict[str, float]]:
    """`objectives.token_loss` from last hidden states [B, T, H] and unshifted labels [B, T]: same loss, same
    metrics, same reduction; no [tokens x vocab] tensor. Masked positions never reach the lm_head."""
    h, y, rows = select_response(hidden, labels, ignore_index)
    ref_h = None if ref_hidden is None else select_response(ref_hidden, labels, ignore_index)[0]
    return fused_loss_selected(
        mode,
        h,
        y,
        rows,
        head,
        ref_h,
        ref_head,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        ref_cache=ref_cache,
        **objective,
    )
