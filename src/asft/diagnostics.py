"""The base model's prior on a dataset: p(y_t) of every response token, and what each weight rule makes of it.

p-weighted objectives (dft, asft: the token's cross-entropy weighted by sg[p(y_t)]) can only move tokens the base
model already puts mass on; where the answer hangs on tokens it finds improbable they stall (arXiv 2510.00526).
This module measures that before any training:

- `score_features` / `scores_from_cache`: p(y_t), the entropy of the next-token distribution, the label ids and
  each token's example, from a model forward pass (teacher forced, float32) or for free from a reference cache
  (exact p(y_t); the entropy over the cache's k + 1 buckets, a lower bound);
- `prior_report`: the numbers `asft data inspect --prior` prints (and `--json` dumps): token count, mean / median /
  quantiles of p, the share below 0.1 and above 0.9, the NLL of a whole response, a histogram, the improbable
  token strings, the mean entropy, and per probability bin the share of SFT's gradient weight each p-weighted rule
  keeps;
- `bin_table`: the mechanism after training: response tokens binned by the *base* model's p(y_t), per bin the mean
  p(y_t) under a trained model (`asft compare --probs_data`, `asft plot --kind probs`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# The probability bins of the mechanism table and of the weight shares: [0, 0.1), [0.1, 0.5), [0.5, 0.9), [0.9, 1].
BIN_EDGES = (0.0, 0.1, 0.5, 0.9, 1.0)
BIN_LABELS = ("[0, 0.1)", "[0.1, 0.5)", "[0.5, 0.9)", "[0.9, 1]")
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
HISTOGRAM_BINS = 10

# Per-token weight on the cross-entropy, relative to SFT's 1. Extensible: a rule is a name and a function of p.
WEIGHT_RULES = {
    "p (dft, asft)": lambda p: p,
    "p^0.5": lambda p: np.sqrt(p),
    "max(p, 0.1)": lambda p: np.maximum(p, 0.1),
}


@dataclass
class TokenScores:
    """Per response token, in `objectives.select_response` order: p(y_t), the entropy of the model's next-token
    distribution (nats), the label id and the index of its example among the scored ones."""

    probs: np.ndarray
    entropy: np.ndarray
    targets: np.ndarray
    examples: np.ndarray
    entropy_exact: bool = True

    def __len__(self) -> int:
        return len(self.probs)


def bin_index(probs) -> np.ndarray:
    """0..3: the bin of each probability ([0, 0.1), [0.1, 0.5), [0.5, 0.9), [0.9, 1])."""
    return np.searchsorted(np.asarray(BIN_EDGES[1:-1]), np.asarray(probs, dtype=np.float64), side="right")


def response_features(features: list[dict]) -> list[dict]:
    """The features that hold at least one response token (after the first position: labels are shifted)."""
    return [f for f in features if any(label != -100 for label in f["labels"][1:])]


def score_features(model, features: list[dict], pad_id: int, batch_size: int = 8) -> TokenScores:
    """p(y_t) and the entropy of every response token of tokenized examples under `model` (teacher forced)."""
    import torch

    from .data import right_pad
    from .objectives import select_response

    device = next(model.parameters()).device
    probs, entropy, targets, examples = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            inputs = right_pad(features[start : start + batch_size], pad_id, device)
            labels = inputs.pop("labels")
            z, y, rows = select_response(model(**inputs).logits, labels)
            logp = torch.log_softmax(z.float(), -1)
            probs.append(logp.gather(-1, y[:, None]).squeeze(-1).exp().double().cpu())
            entropy.append(-(logp.exp() * logp).sum(-1).double().cpu())
            targets.append(y.cpu())
            examples.append(rows.cpu() + start)
    cat = torch.cat if probs else None
    if cat is None:
        empty = np.zeros(0)
        return TokenScores(empty, empty, empty.astype(np.int64), empty.astype(np.int64))
    return TokenScores(
        cat(probs).numpy(), cat(entropy).numpy(), cat(targets).numpy().astype(np.int64), cat(examples).numpy()
    )


def scores_from_cache(cache, features: list[dict], tokenizer=None, template=None, max_length=None) -> TokenScores:
    """The same numbers read from a reference cache (`asft cache-reference`), without a model: p(y_t) is exact; the
    entropy is over the cache's k + 1 buckets (top-k and the tail), a lower bound of the full one.

    features[i] must be the cache's example i (checked by fingerprint; the settings too when given)."""
    import torch

    if tokenizer is not None or template is not None:
        cache.check_settings(tokenizer=tokenizer, template=template, max_length=max_length)
    for i, f in enumerate(features):
        cache.check_example(i, f["input_ids"], f["labels"])
    rows = cache.rows(range(len(features)))
    probs = rows.label.double().exp().numpy()
    logp_k = rows.logp.double()
    tail = rows.tail.double()
    ent = -(logp_k.exp() * logp_k).sum(-1) - torch.where(
        torch.isfinite(tail), tail.exp() * tail, torch.zeros_like(tail)
    )
    targets, examples = [], []
    for i, f in enumerate(features):
        ys = [y for y in f["labels"][1:] if y != -100]
        targets += ys
        examples += [i] * len(ys)
    ids = {"targets": np.asarray(targets, dtype=np.int64), "examples": np.asarray(examples, dtype=np.int64)}
    return TokenScores(probs, ent.numpy(), **ids, entropy_exact=False)


def weight_shares(probs) -> list[dict]:
    """Per probability bin: the share of tokens (= of SFT's gradient weight), and for each rule in WEIGHT_RULES the
    share of the rule's total weight and `relative`, the mean weight (the fraction of SFT's weight it keeps there)."""
    p = np.asarray(probs, dtype=np.float64)
    b = bin_index(p)
    weights = {name: rule(p) for name, rule in WEIGHT_RULES.items()}
    totals = {name: float(w.sum()) for name, w in weights.items()}
    out = []
    for i, label in enumerate(BIN_LABELS):
        m = b == i
        n = int(m.sum())
        entry = {"bin": label, "tokens": n, "sft_share": n / max(len(p), 1), "rules": {}}
        for name, w in weights.items():
            entry["rules"][name] = {
                "share": float(w[m].sum()) / totals[name] if totals[name] > 0 else 0.0,
                "relative": float(w[m].mean()) if n else None,
            }
        out.append(entry)
    return out


def prior_report(scores: TokenScores, tokenizer=None, origins: list[str] | None = None, lowest: int = 10) -> dict:
    """The diagnostic as one JSON-able dict (see the module docstring); `origins[i]` names example i."""
    p = np.asarray(scores.probs, dtype=np.float64)
    n = len(p)
    if n == 0:
        raise ValueError("no response tokens to score")
    counts, _ = np.histogram(p, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    report = {
        "tokens": n,
        "examples": int(len(np.unique(scores.examples))),
        "mean_prob": float(p.mean()),
        "median_prob": float(np.median(p)),
        "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(p, q)) for q in QUANTILES},
        "frac_below_0.1": float((p < 0.1).mean()),
        "frac_above_0.9": float((p >= 0.9).mean()),
        **response_nll(p, scores.examples),
        "mean_entropy": float(np.mean(scores.entropy)),
        "entropy_exact": bool(scores.entropy_exact),
        "histogram": [
            {"from": i / HISTOGRAM_BINS, "to": (i + 1) / HISTOGRAM_BINS, "tokens": int(c), "share": float(c) / n}
            for i, c in enumerate(counts)
        ],
        "bins": weight_shares(p),
        "lowest_tokens": lowest_tokens(scores, tokenizer, origins, lowest) if tokenizer is not None else [],
    }
    return report


def response_nll(probs, examples) -> dict:
    """The base model's NLL of each example's whole response, -sum_t log p(y_t) in nats: mean and median over examples.

    Not the mean over tokens: a few near-impossible tokens (a made-up word at 1e-5) and many merely improbable
    ones (a derivation's ten digits at 0.03) both make a whole answer improbable, which a token mean hides. In
    benchmarks/regimes.py dft and asft lost to sft on the two tasks whose training files gave 38 and 66 nats and
    matched it on those with 11 and 4: four tasks, found after the run, a hypothesis to test rather than a rule.
    """
    nll = np.bincount(examples, weights=-np.log(np.maximum(probs, 1e-300)))[np.bincount(examples) > 0]
    return {"mean_response_nll": float(nll.mean()), "median_response_nll": float(np.median(nll))}


def lowest_tokens(scores: TokenScores, tokenizer, origins: list[str] | None = None, limit: int = 10) -> list[dict]:
    """The token strings most often improbable (p < 0.1): count below 0.1, total count, mean p, one example."""
    groups = defaultdict(list)
    for j, y in enumerate(scores.targets.tolist()):
        groups[y].append(j)
    rows = []
    for y, idx in groups.items():
        probs = scores.probs[idx]
        low = [j for j in idx if scores.probs[j] < 0.1]
        if not low:
            continue
        first = min(low, key=lambda j: scores.probs[j])
        e = int(scores.examples[first])
        rows.append(
            {
                "token": tokenizer.decode([y]),
                "below_0.1": len(low),
                "count": len(idx),
                "mean_prob": float(probs.mean()),
                "example": origins[e] if origins and e < len(origins) else f"example {e}",
                "example_prob": float(scores.probs[first]),
            }
        )
    rows.sort(key=lambda r: (-r["below_0.1"], r["mean_prob"]))
    return rows[:limit]


def _bar(share: float, width: int = 40) -> str:
    return "#" * round(share * width)


def format_prior(report: dict, title: str = "") -> str:
    """The text `asft data inspect --prior` prints."""
    r = report
    q = r["quantiles"]
    ent = "" if r["entropy_exact"] else " (over the cache's top-k + tail buckets: a lower bound)"
    lines = [
        f"prior{(' of ' + title) if title else ''}: p(y_t) of {r['tokens']} response tokens in "
        f"{r['examples']} examples",
        f"  mean p {r['mean_prob']:.4f} | median {r['median_prob']:.4f} | below 0.1: {100 * r['frac_below_0.1']:.1f}% "
        f"| at or above 0.9: {100 * r['frac_above_0.9']:.1f}% | mean entropy {r['mean_entropy']:.3f} nats{ent}",
        "  quantiles: " + "  ".join(f"{k} {v:.4f}" for k, v in q.items()),
        f"  NLL of a whole response (nats): mean {r['mean_response_nll']:.2f} | median {r['median_response_nll']:.2f}",
        "",
        "  histogram of p(y_t) (share of tokens)",
    ]
    for h in r["histogram"]:
        lines.append(
            f"  [{h['from']:.1f}, {h['to']:.1f}{']' if h['to'] == 1 else ')'} {100 * h['share']:5.1f}% "
            + _bar(h["share"])
        )
    rules = list(r["bins"][0]["rules"])
    lines += [
        "",
        "  gradient weight per bin: the tokens' share (SFT's weight), each rule's share of its own total weight, and",
        "  in parentheses the fraction of SFT's per-token weight the rule keeps there (its mean weight)",
        "  " + f"{'bin':<12}{'tokens':>8}{'sft':>8}" + "".join(f"{name:>22}" for name in rules),
    ]
    for b in r["bins"]:
        cells = "".join(
            f"{100 * v['share']:>12.1f}% ({'-' if v['relative'] is None else format(v['relative'], '.3f')})"
            for v in b["rules"].values()
        )
        lines.append(f"  {b['bin']:<12}{b['tokens']:>8}{100 * b['sft_share']:>7.1f}%" + cells)
    if r["lowest_tokens"]:
        lines += ["", "  token strings most often below p 0.1: count below 0.1 / all, mean p, one example"]
        for t in r["lowest_tokens"]:
            lines.append(
                f"  {t['token']!r:<16} {t['below_0.1']:>5} / {t['count']:<5} mean p {t['mean_prob']:.4f}  "
                f"e.g. {t['example']} (p {t['example_prob']:.2g})"
            )
    lines += ["", prior_line(r)]
    return "\n".join(lines)


def prior_line(report: dict) -> str:
    """One line: what `asft train` prints in a p-weighted mode when the reference's label log-probs are at hand."""
    r = report
    keep = next(v for v in r["bins"][0]["rules"].values())["relative"]
    keep = "-" if keep is None else f"{keep:.3f}"
    return (
        f"prior: mean p(y_t) {r['mean_prob']:.3f}, median {r['median_prob']:.3f}, {100 * r['frac_below_0.1']:.1f}% "
        f"of {r['tokens']} response tokens below 0.1 (a p-weighted rule keeps {keep} of SFT's weight there), "
        f"{100 * r['frac_above_0.9']:.1f}% at or above 0.9"
    )


def cache_prior_line(path) -> str:
    """The one-line prior of a reference cache's training set (its exact label log-probs; no model, no data)."""
    from .cache import ReferenceCache

    logp, examples = ReferenceCache(path).label_logprobs()
    probs = np.exp(logp)
    scores = TokenScores(probs, np.zeros_like(probs), np.zeros(len(probs), dtype=np.int64), examples)
    return prior_line(prior_report(scores))


def bin_table(base_probs, after_probs: dict[str, np.ndarray] | np.ndarray) -> list[dict]:
    """Response tokens binned by the base model's p(y_t); per bin the token count, the base's mean p and, for each
    trained model (aligned token by token with the base), its mean p (teacher forced) after training."""
    base = np.asarray(base_probs, dtype=np.float64)
    after = after_probs if isinstance(after_probs, dict) else {"after": after_probs}
    after = {k: np.asarray(v, dtype=np.float64) for k, v in after.items()}
    for name, v in after.items():
        if v.shape != base.shape:
            raise ValueError(f"{name}: {v.shape[0]} tokens scored, the base {base.shape[0]}: not the same tokens")
    b = bin_index(base)
    rows = []
    for i, label in enumerate(BIN_LABELS):
        m = b == i
        n = int(m.sum())
        rows.append(
            {
                "bin": label,
                "tokens": n,
                "base": float(base[m].mean()) if n else None,
                "after": {k: (float(v[m].mean()) if n else None) for k, v in after.items()},
            }
        )
    return rows


def format_bin_table(rows: list[dict]) -> str:
    """The mechanism table as markdown: one line per bin, one column per model."""
    names = list(rows[0]["after"]) if rows else []

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [
        "| base p(y_t) bin | tokens | base mean p | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        lines.append(
            f"| {r['bin']} | {r['tokens']} | {f(r['base'])} | " + " | ".join(f(r["after"][k]) for k in names) + " |"
        )
    return "\n".join(lines)


def model_scores(model_path: str, features: list[dict], batch_size: int = 8, base_model: str | None = None):
    """Load a model (folder, adapter, hub id, embedded:...) and score tokenized features; returns TokenScores."""
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, base_model=base_model)
    return score_features(model, features, tokenizer.pad_token_id, batch_size)


def tokenized(
    data: str,
    tokenizer,
    template: str = "auto",
    max_length: int | None = None,
    limit: int | None = None,
    on_bad_rows: str = "error",
):
    """(features, origins) of a data file (or comma-separated files), tokenized, kept and refused as training does
    (data.tokenized_examples); an example whose only response token is its first (nothing predicts it) is left out."""
    from .data import load_examples, resolve_template, tokenized_examples

    examples, _ = load_examples([p.strip() for p in data.split(",") if p.strip()], on_bad_rows)
    features, origins = [], []
    for ex, f, _ in tokenized_examples(
        examples, resolve_template(template, tokenizer), tokenizer, max_length, on_bad_rows
    ):
        if response_features([f]):
            features.append(f)
            origins.append(f"{ex.source}:{ex.line}")
        if limit and len(features) >= limit:
            break
    return features, origins
