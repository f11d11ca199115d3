"""Parity with the paper's training script: its Alpaca prompt, its tokenization and masking, its per-micro-batch
mean. The expected side is written here from the paper's format (Stanford Alpaca's PROMPT_DICT, EOS appended to
the response as text, the first len(tokens(prompt)) tokens masked), never taken from asft's own output."""

import json

import pytest
import torch
import torch.nn.functional as F

from asft.cli import main
from asft.data import IGNORE_INDEX, Row, to_example, tokenize
from conftest import cli_args, write_jsonl

# The paper's PROMPT_DICT, spelled out: no newline after "### Response:".
PAPER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
PAPER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

ROWS = [
    {"instruction": "what is 2 + 3", "input": "", "output": "The answer is 5"},
    {"instruction": "add the numbers", "input": "4 and 1", "output": "4 + 1 = 5"},
    {"instruction": "name a fruit", "input": "", "output": ".apple, the quick one"},  # punctuation at the seam
    {"instruction": "what is the sum", "input": "7 8", "output": "The answer is 15, the sum of two numbers"},
]


def paper_preprocess(row, tokenizer):
    """The paper script's preprocessing: source + target tokenized at once, the source's tokens masked."""
    template = PAPER_WITH_INPUT if row["input"] != "" else PAPER_NO_INPUT
    source = template.format_map(row)
    target = f"{row['output']}{tokenizer.eos_token}"
    ids = tokenizer(source + target)["input_ids"]
    labels = list(ids)
    n_source = len(tokenizer(source)["input_ids"])
    labels[:n_source] = [IGNORE_INDEX] * n_source
    return source + target, ids, labels


@pytest.mark.parametrize("index", range(len(ROWS)))
def test_alpaca_template_renders_the_papers_text_tokens_and_mask(tokenizer, index):
    row = ROWS[index]
    text, ids, labels = paper_preprocess(row, tokenizer)
    assert "### Response:\n" not in text and text.count("### Response:") == 1
    example = to_example(Row("rows.jsonl", index + 1, row), "alpaca")
    assert "".join(t for t, _ in _segments(example, tokenizer)) == text
    item = tokenize(example, "alpaca", tokenizer)
    assert item["input_ids"] == ids
    assert item["labels"] == labels


def _segments(example, tokenizer):
    from asft.data import render

    return render(example, "alpaca", tokenizer)


def _batch(items, pad_id):
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in items])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in items])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in items])
    return input_ids, labels, mask


def paper_asft_loss(logits, ref_logits, labels, kl_weight):
    """The paper's asft loss of one micro-batch: mean over its response tokens of sg[p] * CE + w * KL(ref || pi)."""
    logits, ref_logits, labels = logits[:, :-1].float(), ref_logits[:, :-1].float(), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    logp = F.log_softmax(logits[keep], -1)
    logr = F.log_softmax(ref_logits[keep], -1)
    lp_y = logp.gather(-1, labels[keep][:, None])[:, 0]
    kl = (logr.exp() * (logr - logp)).sum(-1)
    return (-(lp_y.exp().detach() * lp_y) + kl_weight * kl).mean()


# AdamW (the paper's optimizer) for the per-step losses; plain SGD for the weights. Adam divides each gradient
# component by its own running magnitude, so a component that is float32 rounding noise (|g| ~ 1e-9, sign and size
# set by summation order, i.e. by the CPU's kernels) still moves its weight by up to lr per step: comparing weights
# after Adam steps compares CPUs, not code. Those components barely move the loss (first order g * dw ~ 0), so
# the losses stay a sharp check under AdamW; under SGD the update is lr * g and the weights are one too.
@pytest.mark.parametrize("optim,lr", [("adamw_torch", 1e-3), ("sgd", 0.5)])
def test_training_matches_the_papers_script(tiny_model_dir, tokenizer, tmp_path, optim, lr):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, ROWS)
    kl_weight, steps = 0.05, 3
    out = tmp_path / "asft"
    assert (
        main(
            cli_args(
                "train",
                f"--optim={optim}",
                *(
                    "--template alpaca --loss_normalization micro_batch --mode asft"
                    " --lr_scheduler_type constant --per_device_train_batch_size 2 --gradient_accumulation_steps"
                    " 2 --train_sampling_strategy sequential --save_strategy no --use_cpu --disable_tqdm true"
                ).split(),
                model_name_or_path=tiny_model_dir,
                data_path=data,
                output_dir=out,
                kl_weight=kl_weight,
                learning_rate=lr,
                max_steps=steps,
            )
        )
        == 0
    )
    logged = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "nll" in r]

    # The paper's script, reimplemented: same rows, micro-batches of 2 in file order, mean per micro-batch,
    # averaged over the 2 accumulation steps; AdamW and clipping as transformers' Trainer applies them.
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    if optim == "sgd":
        optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    items = [paper_preprocess(r, tokenizer)[1:] for r in ROWS]
    expected = []
    for _ in range(steps):
        total = 0.0
        for start in (0, 2):
            input_ids, labels, mask = _batch(items[start : start + 2], tokenizer.pad_token_id)
            with torch.no_grad():
                ref_logits = reference(input_ids=input_ids, attention_mask=mask).logits
            loss = (
                paper_asft_loss(policy(input_ids=input_ids, attention_mask=mask).logits, ref_logits, labels, kl_weight)
                / 2
            )
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(total)
    # A float32 loss over ~100 tokens carries ~1e-6 relative rounding: 1e-5 leaves a margin of 10.
    assert logged == pytest.approx(expected, rel=1e-5)
    if optim != "sgd":
        return
    # SGD: the weight change is lr * (clipped) gradient. Its float32 error is ~1e-6 of the largest change (the
    # gradient's summation order), plus the rounding of w + dw at each step (<= 2^-24 |w| per step). A wrong mask,
    # template or normalisation changes the update by orders of magnitude more.
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    change = {k: v - initial[k] for k, v in policy.state_dict().items()}
    scale = max(float(d.abs().max()) for d in change.values())
    assert scale > 1e-3, "SGD did not move the weights"
    for key, value in policy.state_dict().items():
        error = (trained[key] - initial[key] - change[key]).abs()
        bound = 1e-5 * scale + steps * 2**-24 * value.abs()
        assert bool((error <= bound).all()), f"{key}: max error {float(error.max()):.3g} > bound"
