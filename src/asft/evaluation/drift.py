"""Drift: how far training moved the model from its reference, on prompt/response pairs.

Reports the mean over response tokens of KL(reference || model) (the paper's direction, over the full vocabulary,
in float32), the model's NLL of the responses, and the reference's. The files are the training formats
(instruction/response, prompt/completion, messages, conversations), rendered and tokenized exactly as training
does (`asft.data`), so the tokens measured are the tokens trained on.

The reference is the adapter-disabled base for a LoRA adapter, else --base_model. It needs every token's full
distribution, so it runs with the transformers backend only.
"""

from __future__ import annotations

import sys

import torch

from ..data import detect_format, load_examples, right_pad, tokenize
from ..errors import EvalError
from ..models import is_adapter_dir, load_model_and_tokenizer, resolve_model_path
from ..objectives import kl_from_logprobs, select_response
from .datafiles import Dataset, Item, file_rows
from .report import DatasetResult

NAME = "drift"


def load(path: str, args=None) -> tuple[str, list[Item]]:
    examples, _ = load_examples([path])
    fmt = detect_format(file_rows(path)[0].data) or "unknown"
    return fmt, [Item(i, ex.line, meta={"example": ex}) for i, ex in enumerate(examples)]


def check_args(args) -> None:
    if args.backend != "hf":
        raise EvalError("--task drift needs every token's full distribution, which only --backend hf gives")
    if not args.base_model and not is_adapter_dir(resolve_model_path(args.model, args.trust_remote_code)):
        raise EvalError(
            "--task drift needs --base_model (the model before training) unless --model is a LoRA "
            "adapter, whose base with the adapter switched off is the reference"
        )
    if args.merge_adapter:
        raise EvalError("--merge_adapter: drift switches the adapter off to get the reference; leave it unmerged")


def settings(args) -> dict:
    return {"max_length": args.max_length, "measure": "KL(reference || model) per response token, float32"}


def _reference(run):
    """A callable giving reference logits: the same weights with the adapter off, or the --base_model copy."""
    model = run.backend.model
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):

        def adapter_off(**batch):
            with model.disable_adapter():
                return model(**batch).logits

        return adapter_off
    if "reference" not in run.state:
        print(f"Loading the reference {run.args.base_model} ...", file=sys.stderr, flush=True)
        run.state["reference"], _ = load_model_and_tokenizer(
            run.args.base_model,
            dtype=run.args.dtype,
            device=run.args.device,
            trust_remote_code=run.args.trust_remote_code,
        )
    return lambda **batch: run.state["reference"](**batch).logits


@torch.no_grad()
def measure(run, batch: list[Item]) -> list[list[dict]]:
    """Per item: the sums over its response tokens of KL, NLL and reference NLL, and the token count."""
    model = run.backend.model
    reference = _reference(run)
    inputs = right_pad([it.meta["features"] for it in batch], run.tokenizer.pad_token_id, run.backend.device)
    labels = inputs.pop("labels")
    z, y, rows = select_response(model(**inputs).logits, labels)
    ref_z, _, _ = select_response(reference(**inputs), labels)
    logp, logrho = torch.log_softmax(z.float(), -1), torch.log_softmax(ref_z.float(), -1)
    per_token = {
        "kl": kl_from_logprobs(logp, logrho, "forward"),
        "nll": -logp.gather(-1, y[:, None]).squeeze(-1),
        "ref_nll": -logrho.gather(-1, y[:, None]).squeeze(-1),
        "tokens": torch.ones_like(y, dtype=torch.float32),
    }
    sums = {k: torch.zeros(len(batch), device=v.device).index_add_(0, rows, v).tolist() for k, v in per_token.items()}
    return [[{k: sums[k][i] for k in sums}] for i in range(len(batch))]


def prepare(run, datasets: list[Dataset]) -> None:
    """Render and tokenize every row first: a row the template cannot render fails before any model is loaded."""
    for ds in datasets:
        for it in ds.items:
            it.meta["features"] = tokenize(it.meta["example"], run.template, run.tokenizer, run.args.max_length)


def evaluate(run, ds: Dataset) -> DatasetResult:
    outputs = run.complete(
        ds, ds.items, lambda batch: measure(run, batch), length=lambda it: len(it.meta["features"]["input_ids"])
    )
    totals = {k: sum(outputs[it.index][0][k] for it in ds.items) for k in ("kl", "nll", "ref_nll", "tokens")}
    tokens = totals["tokens"]
    predictions = []
    for it in ds.items:
        o = outputs[it.index][0]
        per = {k: (o[k] / o["tokens"] if o["tokens"] else None) for k in ("kl", "nll", "ref_nll")}
        predictions.append(
            {
                "index": it.index,
                "prediction": per["kl"],
                "gold": None,
                "correct": None,
                "nll": per["nll"],
                "ref_nll": per["ref_nll"],
                "tokens": int(o["tokens"]),
            }
        )
    extra = {
        "nll": totals["nll"] / tokens if tokens else None,
        "ref_nll": totals["ref_nll"] / tokens if tokens else None,
        "tokens": int(tokens),
        "n_without_response_tokens": sum(p["tokens"] == 0 for p in predictions),
        "kl_direction": "forward: KL(reference || model)",
    }
    return DatasetResult(
        ds.name, ds.path, ds.format, "kl", totals["kl"] / tokens if tokens else None, len(ds.items), extra, predictions
    )
