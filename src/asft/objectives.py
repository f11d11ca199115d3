"""The training objectives of ASFT and its baselines: the one place their math lives.

Every objective is one formula with its own token weight w_t (detached, sg = stop-gradient):

    l_t = sg[w_t] * CE_t + kl_weight * KL_t (the anchor: sft_kl, asft, or any rule with ``anchor=True``)

with CE_t = -log pi(y_t), computed in float32 whatever the model's dtype. The weight rules (`WEIGHT_RULES`):

    sft     1
    dft     pi(y_t)^weight_power                                   (1: DFT; Beyond Log Likelihood's p^alpha)
    iw_sft  clamp(exp(mean_t log pi(y_t)/rho(y_t)), 0, iw_max) per sequence (or the clamped token ratio)
    eaft    (H_t / 3.0)^eaft_power, H_t the entropy of the softmax over the policy's top-eaft_topk logits
    prift   rho(y_t), the frozen reference's probability of the label
    sft_kl / asft: sft / dft with the anchor.   weight_floor: w = max(w, weight_floor) on any weighted rule.

KL_t is over the full vocabulary: KL(reference || policy) for ``kl_direction="forward"`` (the paper's code and
LLaMA-Factory), KL(policy || reference) for ``"reverse"``. The loss is the sum of l_t divided by N, the number of
response tokens in the whole optimizer step (``num_items_in_batch``), so that the gradient does not depend on how
a batch is split into micro-batches or ranks.

``asft.fused`` computes the same quantities chunk by chunk from hidden states; it reuses the helpers below (the
weight rules unchanged: because w is detached, every rule's logit gradient is w_t * (pi - onehot(y_t))).

A cached reference (``CachedRows``, built by ``asft cache-reference``) holds only the reference's top-k
log-probabilities per response token; the KL is then taken over k + 1 buckets (see ``bucketed_kl``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KL_DIRECTIONS = ("forward", "reverse")
IW_LEVELS = ("sequence", "token")
# iw-SFT's token-level variant clamps pi/rho to this range (its authors' code).
IW_TOKEN_CLAMP = (0.2, 1.8)
# EAFT divides the top-k entropy by this constant (LLaMA-Factory's `use_eaft_loss`: ~log 20, the top-20 maximum).
EAFT_ENTROPY_SCALE = 3.0


# ----------------------------------------------------------------------------------------------------------------
# The token weights: one pure function per rule, registered once in WEIGHT_RULES.


@dataclass
class TokenStats:
    """What a weight rule may read of n response tokens (float32 [n] each; None where the call has none):
    log pi(y_t), log rho(y_t) (a reference), the batch row of each token (iw-SFT's sequences), and the entropy
    of the softmax over the policy's top-k logits (k = eaft_topk; computed only for rules that read it)."""

    logp_y: Tensor
    logrho_y: Tensor | None = None
    rows: Tensor | None = None
    topk_entropy: Tensor | None = None


def unit_weight(t: TokenStats, s: ObjectiveSettings) -> Tensor:
    return torch.ones_like(t.logp_y, dtype=torch.float32)


def prob_weight(t: TokenStats, s: ObjectiveSettings) -> Tensor:
    """pi(y_t)^alpha: DFT at alpha = 1 (exactly its exp(log p)), sft at 0; the gradient of (1 - p^alpha) / alpha."""
    logp = t.logp_y.detach().float()
    if s.weight_power == 1:
        return logp.exp()
    if s.weight_power == 0:
        return torch.ones_like(logp)
    return (s.weight_power * logp).exp()


def importance_weight(t: TokenStats, s: ObjectiveSettings) -> Tensor:
    return importance_weights(t.logp_y, t.logrho_y, t.rows, iw_max=s.iw_max, level=s.iw_level)


def eaft_weight(t: TokenStats, s: ObjectiveSettings) -> Tensor:
    """(H_t / 3.0)^alpha, H_t the entropy over the policy's top-k logits (EAFT; LLaMA-Factory's formula)."""
    return torch.pow(t.topk_entropy.detach().float() / EAFT_ENTROPY_SCALE, s.eaft_power)


def prior_weight(t: TokenStats, s: ObjectiveSettings) -> Tensor:
    """rho(y_t): the frozen reference's probability of the label (PriFT-prob)."""
    return t.logrho_y.detach().float().exp()


@dataclass(frozen=True)
class WeightRule:
    """A registered rule: its weight function, the ObjectiveSettings fields it reads (giving any other rule
    parameter is an error), what of `TokenStats` it needs, and whether its mode carries the anchor by default."""

    weight: Callable[[TokenStats, ObjectiveSettings], Tensor]
    params: tuple[str, ...] = ()
    reads_reference: bool = False  # log rho(y_t): a reference model or cache is needed even without the anchor
    reads_topk_entropy: bool = False
    anchored: bool = False  # the KL term is in the loss without --anchor (sft_kl, asft)


# The modes, in the order the CLI lists them. A new rule: its weight function above and one line here.
WEIGHT_RULES: dict[str, WeightRule] = {
    "sft": WeightRule(unit_weight),
    "dft": WeightRule(prob_weight, ("weight_power", "weight_floor")),
    "sft_kl": WeightRule(unit_weight, anchored=True),
    "asft": WeightRule(prob_weight, ("weight_power", "weight_floor"), anchored=True),
    "iw_sft": WeightRule(importance_weight, ("iw_max", "iw_level", "weight_floor"), reads_reference=True),
    "eaft": WeightRule(eaft_weight, ("eaft_topk", "eaft_power", "weight_floor"), reads_topk_entropy=True),
    "prift": WeightRule(prior_weight, ("weight_floor",), reads_reference=True),
}
MODES = tuple(WEIGHT_RULES)
MODE_ALIASES = {"sft+kl": "sft_kl", "sft-kl": "sft_kl", "iw-sft": "iw_sft", "iwsft": "iw_sft"}
# Rule parameters whose non-default value a mode that does not read them refuses (iw_max / iw_level predate the
# rule: they stay ignored outside iw_sft, as they always were).
RULE_PARAMETERS = {"weight_power": 1.0, "weight_floor": 0.0, "eaft_topk": 20, "eaft_power": 1.0}


def normalize_mode(mode: str) -> str:
    """Return the canonical name of a training mode, accepting the aliases the paper's script uses."""
    canonical = MODE_ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
    if canonical not in MODES:
        raise ValueError(f"mode: unknown value {mode!r}; expected one of {', '.join(MODES)} (or 'sft+kl')")
    return canonical


@dataclass(frozen=True)
class ObjectiveSettings:
    """Everything that defines the objective but its tensors; validated on construction (ValueError naming the
    field). `anchor`: None is the mode's own (on for sft_kl / asft, off otherwise); True adds the KL term to any
    rule; False on sft_kl / asft is a contradiction and refused."""

    mode: str = "asft"
    kl_weight: float = 0.03
    kl_direction: str = "forward"
    iw_max: float = 16.0
    iw_level: str = "sequence"
    weight_power: float = 1.0
    weight_floor: float = 0.0
    eaft_topk: int = 20
    eaft_power: float = 1.0
    anchor: bool | None = None

    def __post_init__(self):
        mode = normalize_mode(self.mode)
        object.__setattr__(self, "mode", mode)
        rule = WEIGHT_RULES[mode]
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction: unknown value {self.kl_direction!r}; expected 'forward' or 'reverse'")
        if self.kl_weight is None or self.kl_weight < 0:
            raise ValueError(f"kl_weight: must be >= 0, got {self.kl_weight}")
        if self.iw_max <= 0:
            raise ValueError(f"iw_max: must be > 0, got {self.iw_max}")
        if self.iw_level not in IW_LEVELS:
            raise ValueError(f"iw_level: unknown value {self.iw_level!r}; expected 'sequence' or 'token'")
        for name in ("weight_power", "weight_floor", "eaft_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if int(self.eaft_topk) != self.eaft_topk or self.eaft_topk < 1:
            raise ValueError(f"eaft_topk: must be an integer >= 1, got {self.eaft_topk}")
        for name, default in RULE_PARAMETERS.items():
            if getattr(self, name) != default and name not in rule.params:
                users = ", ".join(m for m, r in WEIGHT_RULES.items() if name in r.params)
                raise ValueError(
                    f"{name}: mode {mode!r} does not use it (it would be ignored); it applies to {users}. "
                    f"Leave it at {default} or pick one of those modes"
                )
        if self.anchor is False and rule.anchored:
            raise ValueError(f"anchor: mode {mode!r} is anchored by definition; --anchor false contradicts it")

    @property
    def rule(self) -> WeightRule:
        return WEIGHT_RULES[self.mode]

    @property
    def anchored(self) -> bool:
        """Whether kl_weight * KL_t is in the loss."""
        return self.rule.anchored or bool(self.anchor)

    @property
    def needs_reference(self) -> bool:
        return self.anchored or self.rule.reads_reference

    @property
    def whole_sequences(self) -> bool:
        """A weight per sequence (iw-SFT's default): every token of a sequence is needed before any weight."""
        return self.mode == "iw_sft" and self.iw_level == "sequence"

    @property
    def topk(self) -> int:
        """k of the top-k entropy the rule reads; 0 when it reads none."""
        return int(self.eaft_topk) if self.rule.reads_topk_entropy else 0

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, config) -> ObjectiveSettings:
        """The settings of an object holding them as attributes (AnchoredSFTConfig); missing ones default."""
        return cls(**{name: getattr(config, name) for name in cls.fields() if hasattr(config, name)})

    def details(self) -> list[str]:
        """The rule's parameters and the anchor, as words (logs and model cards)."""
        params = self.rule.params
        if self.mode == "iw_sft":  # the level decides which parameter means anything
            params = tuple(p for p in params if p not in ("iw_max", "iw_level"))
            level = "token-level weights (ratio clamped to [0.2, 1.8])" if self.iw_level == "token" else None
            parts = [level or f"sequence-level weights, iw_max {self.iw_max}"]
        else:
            parts = []
        # The rule's parameters where they differ from their defaults (asft at weight_power 1 is the paper's asft).
        parts += [f"{p} {getattr(self, p)}" for p in params if getattr(self, p) != RULE_PARAMETERS.get(p)]
        if self.anchored:
            direction = "KL(reference || policy)" if self.kl_direction == "forward" else "KL(policy || reference)"
            parts.append(f"kl_weight {self.kl_weight}, {direction} ({self.kl_direction})")
        return parts

    def describe(self) -> str:
        """One line: the mode, then its details."""
        return ", ".join([self.mode, *self.details()])


def settings_of(mode: str | ObjectiveSettings, **objective) -> ObjectiveSettings:
    """ObjectiveSettings from a mode name and keyword fields, or a settings object given as is (then no fields)."""
    if isinstance(mode, ObjectiveSettings):
        if objective:
            raise TypeError(f"give the objective's settings or keyword fields, not both: {sorted(objective)}")
        return mode
    unknown = set(objective) - set(ObjectiveSettings.fields())
    if unknown:
        raise TypeError(f"unknown objective setting(s): {', '.join(sorted(unknown))}")
    return ObjectiveSettings(mode, **objective)


def needs_reference(mode: str, anchor: bool | None = None) -> bool:
    """Whether ``mode`` needs a reference (a KL anchor, iw-SFT's ratio, PriFT's prior)."""
    return ObjectiveSettings(mode, anchor=anchor).needs_reference


def uses_kl(mode: str, anchor: bool | None = None) -> bool:
    return ObjectiveSettings(mode, anchor=anchor).anchored


def topk_entropy(z: Tensor, k: int) -> Tensor:
    """Entropy of the softmax over the k largest of float32 logits z [n, V] (EAFT's H_t; k >= V: the full one)."""
    v = z.topk(min(k, z.shape[-1]), dim=-1, sorted=False).values
    lse = v.logsumexp(-1)
    return lse - (torch.exp(v - lse[:, None]) * v).sum(-1)


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
    mode: str | ObjectiveSettings,
    logp_y: Tensor | TokenStats,
    logrho_y: Tensor | None = None,
    rows: Tensor | None = None,
    **objective,
) -> Tensor:
    """The detached weight multiplying each token's cross-entropy: the mode's rule (`WEIGHT_RULES`), then the
    floor. The one place a weight is formed, for the naive, fused and cached paths alike.

    ``token_weights(settings, TokenStats(...))``, or as before
    ``token_weights(mode, logp_y, logrho_y, rows, iw_max=...)``.
    """
    s = settings_of(mode, **objective)
    t = logp_y if isinstance(logp_y, TokenStats) else TokenStats(logp_y, logrho_y, rows)
    w = s.rule.weight(t, s).detach().float()
    return w.clamp(min=s.weight_floor) if s.weight_floor > 0 else w


def check_reference(s: ObjectiveSettings, has_reference: bool) -> None:
    if s.needs_reference and not has_reference:
        raise ValueError(f"mode {s.mode!r} needs reference logits (ref_logits)")


# Logged: the share of response tokens whose weight is below each threshold (a rule that has stopped learning them).
WEIGHT_THRESHOLDS = (0.1,)


def token_metrics(logp_y: Tensor, weight: Tensor, entropy: Tensor, hit: Tensor, kl: Tensor | None) -> dict[str, float]:
    """The logged terms, per response token averaged: nll (plain CE), the weighted term, mean p(y_t), mean weight
    and the share of weights below 0.1, entropy, token accuracy, KL where there is a reference; and the token count
    (the same for both loss paths)."""
    metrics = {
        "nll": -logp_y.mean(),
        "weighted_nll": (weight * -logp_y).mean(),
        "mean_prob": logp_y.exp().mean(),
        "mean_weight": weight.mean(),
        **{f"frac_weight_below_{x}": (weight < x).float().mean() for x in WEIGHT_THRESHOLDS},
        "entropy": entropy.mean(),
        "token_accuracy": hit.mean(),
    }
    if kl is not None:
        metrics["kl"] = kl.mean()
    # One device-to-host copy for all of them (a float() each would wait on the device once per term, every step).
    values = torch.stack([v.float() for v in metrics.values()]).tolist()
    return {**dict(zip(metrics, values)), "num_tokens": float(logp_y.numel())}


def token_loss(
    mode: str | ObjectiveSettings,
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor | None = None,
    *,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    ref_cache: CachedRows | None = None,
    **objective,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of ``mode`` from full logits ``[B, T, V]`` and unshifted labels ``[B, T]`` (the naive path).

    ``mode`` is a mode name with the objective's other settings as keywords (`ObjectiveSettings` fields:
    kl_weight, kl_direction, iw_max, iw_level, weight_power, weight_floor, eaft_topk, eaft_power, anchor), or an
    ObjectiveSettings. The reference is either ``ref_logits`` (full logits, exact KL) or ``ref_cache`` (a cached
    reference for this call's response tokens: the bucketed KL of `bucketed_kl`, and the exact stored
    log rho(y_t) that iw-SFT and PriFT read).

    Returns the scalar loss (sum of per-token losses / ``num_items_in_batch``, or / the response tokens in this
    call when it is None) and the logged terms, each a mean over this call's response tokens:
    ``nll`` (plain cross-entropy), ``weighted_nll`` (the weighted term), ``kl`` (when a reference is given),
    ``mean_prob`` (mean pi(y_t)), ``mean_weight``, ``frac_weight_below_0.1``, ``entropy``, ``token_accuracy``,
    and ``num_tokens``.
    """
    if ref_logits is not None and ref_cache is not None:
        raise ValueError("give ref_logits or ref_cache, not both")
    s = settings_of(mode, **objective)
    check_reference(s, ref_logits is not None or ref_cache is not None)
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

    entropy_k = topk_entropy(z.detach().float(), s.topk) if s.topk else None
    weight = token_weights(s, TokenStats(logp_y, logrho_y, rows, entropy_k))
    per_token = weight * ce
    kl = None
    if logrho is not None:
        kl = kl_from_logprobs(logp, logrho, s.kl_direction)
    elif ref_cache is not None:
        kl = bucketed_kl(logp, ref_cache, s.kl_direction)
    if s.anchored:
        per_token = per_token + s.kl_weight * kl

    denom = n if num_items_in_batch is None else num_items_in_batch
    loss = per_token.sum() / torch.as_tensor(denom, device=per_token.device, dtype=torch.float32).clamp(min=1)

    with torch.no_grad():
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        metrics = token_metrics(logp_y, weight, entropy, (z.argmax(-1) == y).float(), kl)
    return loss, metrics
