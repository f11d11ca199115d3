"""The training objectives of ASFT and its baselines: the one place their math lives.

Every per-token quantity is computed in float32 whatever the model's dtype. For a response token t with policy
log-probabilities log pi, reference log-probabilities log rho and label y:

    sft     CE_t                         CE_t = -log pi(y_t)
    dft     sg[pi(y_t)] * CE_t           sg = stop-gradient
    sft_kl  CE_t + kl_weight * KL_t
    asft    sg[pi(y_t)] * CE_t + kl_weight * KL_t
    iw_sft  sg[w] * CE_t                 w = clamp(exp(mean_t log pi(y_t)/rho(y_t)), 0, iw_max) per sequence

KL_t is over the full vocabulary: KL(reference || policy) for ``kl_direction="forward"`` (the paper's code and
LLaMA-Factory), KL(policy || reference) for ``"reverse"``. The loss is the sum of l_t divided by N, the number of
response tokens in the whole optimizer step (``num_items_in_batch``), so that the gradient does not depend on how
a batch is split into micro-batches or ranks.

``asft.fused`` computes the same quantities chunk by chunk from hidden states; it reuses the helpers below.

A cached reference (``CachedRows``, built by ``asft cache-reference``) holds only the reference's top-k
log-probabilities per response token; the KL is then taken over k + 1 buckets (see ``bucketed_kl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("sft", "dft", "sft_kl", "asft", "iw_sft")
MODE_ALIASES = {"sft+kl": "sft_kl", "sft-kl": "sft_kl", "iw-sft": "iw_sft", "iwsft": "iw_sft"}
KL_DIRECTIONS = ("forward", "reverse")
IW_LEVELS = ("sequence", "token")
# iw-SFT's token-level variant clamps pi/rho to this range (its authors' code).
IW_TOKEN_CLAMP = (0.2, 1.8)


def normalize_mode(mode: str) -> str:
    """Return the canonical name of a training mode, accepting the aliases the paper's script uses."""
    canonical = MODE_ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
    if canonical not in MODES:
        raise ValueError(f"mode: unknown value {mode!r}; expected one of {', '.join(MODES)} (or 'sft+kl')")
    return canonical


def needs_reference(mode: str) -> bool:
    """Whether ``mode`` needs reference log-probabilities (KL anchor or importance weights)."""
    return normalize_mode(mode) in ("sft_kl", "asft", "iw_sft")


def uses_kl(mode: str) -> bool:
    return normalize_mode(mode) in ("sft_kl", "asft")


def select_response(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """Shift for next-token prediction and keep the response positions only.

    Returns ``(logits[n, V], targets[n], rows[n])`` where ``rows`` is the batch row of each kept token.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    rows = mask.nonzero(as_tuple=True)[0]
    return logits[mask], labels[mask], rows


def kl_from_logprobs(logp: Tensor, logrho: Tensor, direction: str = "forward") -> Tensor:
    """Per-token KL over the last (vocabulary) axis, from float32 log-probabilities."""
    if direction == "forward":  # KL(rho || pi)
        return (logrho.exp() * (logrho - logp)).sum(-1)
    if direction == "reverse":  # KL(pi || rho)
        return (logp.exp() * (logp - logrho)).sum(-1)
    raise ValueError(f"kl_direction: unknown value {direction!r}; expected 'forward' or 'reverse'")


@dataclass
class CachedRows:
    """The cached reference of n response tokens, in the order `select_response` keeps them.

    ids [n, k] (the reference's top-k token ids), logp [n, k] (their log-probabilities), tail [n] (log rho_T, the
    log of the probability mass outside the top-k; -inf when k = V) and label [n] (log rho(y_t), exact).
    """

    ids: Tensor
    logp: Tensor
    tail: Tensor
    label: Tensor

    def __len__(self) -> int:
        return self.label.shape[0]

    def __getitem__(self, index) -> CachedRows:
        return CachedRows(self.ids[index], self.logp[index], self.tail[index], self.label[index])

    def to(self, device) -> CachedRows:
        return CachedRows(
            self.ids.to(device).long(),
            self.logp.to(device).float(),
            self.tail.to(device).float(),
            self.label.to(device).float(),
        )


def log_complement(z: Tensor, ids: Tensor) -> Tensor:
    """log sum_{v not in ids} exp(z_v) per row: a log-sum-exp over the complement of the top-k set.

    Never log(1 - sum_K p): when the top-k holds almost all the mass that difference cancels to noise (or below
    zero). -inf when the complement is empty (k = V).
    """
    return z.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _xlogy_diff(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """p * (a - b) with 0 log 0 = 0: zero wherever p == 0 (also when a or b is -inf there)."""
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p))


def bucketed_kl(logp: Tensor, cached: CachedRows, direction: str = "forward") -> Tensor:
    """The KL over the k + 1 buckets of a cached reference, from the policy's full float32 log-probs [n, V].

    With K the cached top-k set, rho_v the reference's probabilities on K, rho_T = 1 - sum_K rho_v its tail mass,
    pi the policy's softmax and pi_T = 1 - sum_K pi_v:

        forward  KL_b = sum_K rho_v (log rho_v - log pi_v) + rho_T (log rho_T - log pi_T)
        reverse  KL_b = sum_K pi_v (log pi_v - log rho_v) + pi_T (log pi_T - log rho_T)

    Merging outcomes never increases a KL, so KL_b <= KL, with equality when k = V (rho_T = 0; 0 log 0 = 0). log pi_T
    is a log-sum-exp over the complement (`log_complement`). Differentiated by autograd here (the naive path);
    `asft.fused` forms the same gradient in closed form.
    """
    logp_k = logp.gather(-1, cached.ids)
    logpi_t = log_complement(logp, cached.ids) if cached.ids.shape[-1] < logp.shape[-1] else None
    return kl_over_buckets(logp_k, logpi_t, cached.logp, cached.tail, direction)


def kl_over_buckets(
    logp_k: Tensor, logpi_t: Tensor | None, logrho_k: Tensor, logrho_t: Tensor, direction: str = "forward"
) -> Tensor:
    """The bucketed KL from both sides' log-probabilities on K [n, k] and of the tail [n] (logpi_t None: no tail
    bucket, k = V). The one place its formula lives; `bucketed_kl` and `asft.fused` both call it."""
    if direction == "forward":
        kl = (logrho_k.exp() * (logrho_k - logp_k)).sum(-1)
        return kl if logpi_t is None else kl + _xlogy_diff(logrho_t.exp(), logrho_t, logpi_t)
    if direction == "reverse":
        kl = (logp_k.exp() * (logp_k - logrho_k)).sum(-1)
        return kl if logpi_t is None else kl + _xlogy_diff(logpi_t.exp(), logpi_t, logrho_t)
    raise ValueError(f"kl_direction: unknown value {direction!r}; expected 'forward' or 'reverse'")


def importance_weights(
    logp_y: Tensor, logrho_y: Tensor, rows: Tensor, *, iw_max: float = 16.0, level: str = "sequence"
) -> Tensor:
    """iw-SFT's per-token weights (no gradient): the sequence's clamped mean log-ratio, or the clamped token ratio."""
    log_ratio = (logp_y - logrho_y).detach().float()
    if level == "token":
        return log_ratio.exp().clamp(*IW_TOKEN_CLAMP)
    if level != "sequence":
        raise ValueError(f"iw_level: unknown value {level!r}; expected 'sequence' or 'token'")
    if rows.numel() == 0:
        return log_ratio
    num_rows = int(rows.max()) + 1
    sums = torch.zeros(num_rows, device=log_ratio.device).index_add_(0, rows, log_ratio)
    counts = torch.zeros(num_rows, device=log_ratio.device).index_add_(0, rows, torch.ones_like(log_ratio))
    seq_weight = (sums / counts.clamp(min=1)).exp().clamp(0.0, iw_max)
    return seq_weight[rows]


def token_weights(
    mode: str,
    logp_y: Tensor,
    logrho_y: Tensor | None = None,
    rows: Tensor | None = None,
    *,
    iw_max: float = 16.0,
    iw_level: str = "sequence",
) -> Tensor:
    """The detached weight multiplying each token's cross-entropy."""
    if mode in ("sft", "sft_kl"):
        return torch.ones_like(logp_y, dtype=torch.float32)
    if mode in ("dft", "asft"):
        return logp_y.detach().float().exp()
    return importance_weights(logp_y, logrho_y, rows, iw_max=iw_max, level=iw_level)


def check_arguments(mode: str, has_reference: bool, kl_weight: float, kl_direction: str, iw_max: float) -> str:
    mode = normalize_mode(mode)
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction: unknown value {kl_direction!r}; expected 'forward' or 'reverse'")
    if kl_weight < 0:
        raise ValueError(f"kl_weight: must be >= 0, got {kl_weight}")
    if iw_max <= 0:
        raise ValueError(f"iw_max: must be > 0, got {iw_max}")
    if needs_reference(mode) and not has_reference:
        raise ValueError(f"mode {mode!r} needs reference logits (ref_logits)")
    return mode


def token_metrics(logp_y: Tensor, weight: Tensor, entropy: Tensor, hit: Tensor, kl: Tensor | None) -> dict[str, float]:
    """The logged terms, per response token averaged: nll (plain CE), the weighted term, mean p(y_t), mean weight,
    entropy, token accuracy, KL where there is a reference; and the token count (the same for both loss paths)."""
    metrics = {
        "nll": -logp_y.mean(),
        "weighted_nll": (weight * -logp_y).mean(),
        "mean_prob": logp_y.exp().mean(),
        "mean_weight": weight.mean(),
        "entropy": entropy.mean(),
        "token_accuracy": hit.mean(),
    }
    if kl is not None:
        metrics["kl"] = kl.mean()
    return {**{k: float(v) for k, v in metrics.items()}, "num_tokens": float(logp_y.numel())}


def token_loss(
    mode: str,
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor | None = None,
    *,
    kl_weight: float = 0.03,
    kl_direction: str = "forward",
    iw_max: float = 16.0,
    iw_level: str = "sequence",
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    ref_cache: CachedRows | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of ``mode`` from full logits ``[B, T, V]`` and unshifted labels ``[B, T]`` (the naive path).

    The reference is either ``ref_logits`` (full logits, exact KL) or ``ref_cache`` (a cached reference for this
    call's response tokens: the bucketed KL of `bucketed_kl`, and iw-SFT's exact stored log rho(y_t)).

    Returns the scalar loss (sum of per-token losses / ``num_items_in_batch``, or / the response tokens in this
    call when it is None) and the logged terms, each a mean over this call's response tokens:
    ``nll`` (plain cross-entropy), ``weighted_nll`` (the weighted term), ``kl`` (when a reference is given),
    ``mean_prob`` (mean pi(y_t)), ``mean_weight``, ``entropy``, ``token_accuracy``, and ``num_tokens``.
    """
    if ref_logits is not None and ref_cache is not None:
        raise ValueError("give ref_logits or ref_cache, not both")
    mode = check_arguments(mode, ref_logits is not None or ref_cache is not None, kl_weight, kl_direction, iw_max)
    z, y, rows = select_response(logits, labels, ignore_index)
    if ref_cache is not None and len(ref_cache) != y.numel():
        raise ValueError(f"ref_cache holds {len(ref_cache)} tokens, the batch {y.numel()} response tokens")
    n = y.numel()
    if n == 0:
        # Keep the graph connected so that backward() works on a micro-batch without response tokens.
        return logits.sum() * 0.0, {"num_tokens": 0.0}

    logp = F.log_softmax(z.float(), dim=-1)
    logp_y = logp.gather(-1, y[:, None]).squeeze(-1)
    ce = -logp_y

    logrho = logrho_y = None
    if ref_logits is not None:
        ref_z, _, _ = select_response(ref_logits, labels, ignore_index)
        logrho = F.log_softmax(ref_z.detach().float(), dim=-1)
        logrho_y = logrho.gather(-1, y[:, None]).squeeze(-1)
    elif ref_cache is not None:
        ref_cache = ref_cache.to(z.device)
        logrho_y = ref_cache.label

    weight = token_weights(mode, logp_y, logrho_y, rows, iw_max=iw_max, iw_level=iw_level)
    per_token = weight * ce
    kl = None
    if logrho is not None:
        kl = kl_from_logprobs(logp, logrho, kl_direction)
    elif ref_cache is not None:
        kl = bucketed_kl(logp, ref_cache, kl_direction)
    if uses_kl(mode):
        per_token = per_token + kl_weight * kl

    denom = n if num_items_in_batch is None else num_items_in_batch
    loss = per_token.sum() / torch.as_tensor(denom, device=per_token.device, dtype=torch.float32).clamp(min=1)

    with torch.no_grad():
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        metrics = token_metrics(logp_y, weight, entropy, (z.argmax(-1) == y).float(), kl)
    return loss, metrics
