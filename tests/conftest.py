"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random Llama models, built offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response:\n### Input:\nQuestion: Options: Answer: The answer is",
    "A. B. C. D. E. 0 1 2 3 4 5 6 7 8 9 + - * / = \\boxed{} what is the sum of two numbers",
    "the quick brown fox jumps over the lazy dog. patient doctor heart blood disease treatment",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}#\n",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few lines, with pad/eos tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, *, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = False):
    """A tiny random LlamaForCausalLM sized to the tokenizer (vocabulary not a power of two)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


# --device: where the tests marked cuda_too build their tensors and models (`pytest -m cuda_too --device cuda`).
def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for the tests marked cuda_too (default: cpu)")


def pytest_collection_modifyitems(config, items):
    device = config.getoption("--device")
    if device == "cpu":
        return
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: CUDA is not available")
    skip = pytest.mark.skip(reason=f"not marked cuda_too: runs on the CPU only (--device {device})")
    for item in items:
        if "cuda_too" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model folder (weights + tokenizer), loadable with from_pretrained offline."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(tokenizer)


# A trainer test's quiet CPU run: nothing reported, no checkpoints, no progress bar; the fused loss in chunks of 5.
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, fused_chunk_size=5, seed=0)
# One plain-SGD step at lr 1 without clipping: the update is exactly minus the gradient.
SGD_STEP = dict(max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
# A short AdamW run that moves the weights a lot, one logged record per step.
ADAMW_RUN = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-2, logging_steps=1)


def tiny_trainer(tokenizer, out, data, mode, implementation="fused", *, peft=False, model=None, **settings):
    """An AnchoredSFTTrainer of `mode` over `data` (the tiny model of seed 1 unless given; a rank-4 LoRA with
    `peft`), its config the QUIET defaults on the CPU, overridden by `settings`."""
    from asft import AnchoredSFTConfig, AnchoredSFTTrainer
    from asft.models import lora_config

    settings = {**QUIET, "use_cpu": True, "mode": mode, "loss_implementation": implementation, **settings}
    model = build_model(tokenizer, seed=1) if model is None else model
    peft_config = lora_config(4, 8, 0.0) if peft else None
    args = AnchoredSFTConfig(output_dir=str(out), **settings)
    return AnchoredSFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)


def write_jsonl(path, rows):
    """Write rows as a JSONL file; return its path."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_args(command: str, *positional, **flags) -> list[str]:
    """An `asft COMMAND` argv: each keyword becomes `--name value` (True: the bare flag `--name`), in order."""
    argv = [command, *map(str, positional)]
    for name, value in flags.items():
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


def eval_argv(task: str, model, data, out, *extra: str, **flags) -> list[str]:
    """`asft eval` argv (after the command): model, task, data, output folder, no progress bar, then `flags` and
    `extra` as given."""
    argv = cli_args("eval", model=model, task=task, data=data, output_dir=out, quiet=True, **flags)[1:]
    return [*argv, *extra]


TINY_RUN = {"logging_steps": 1, "use_cpu": "true", "disable_tqdm": "true"}


def train_cmd(model_dir, data, out, *extra: str, **flags) -> list[str]:
    """`asft train` argv of a tiny CPU run: model, data and output folder, `flags` over the TINY_RUN defaults,
    then `extra` as given (last, so it can override any of them)."""
    base = {"model_name_or_path": model_dir, "data_path": data, "output_dir": out}
    return [*cli_args("train", **base, **{**TINY_RUN, **flags}), *extra]


def sigterm_once_logging(cmd: list[str], metrics, cwd=None, timeout: float = 120):
    """Start `cmd` (a training command), send SIGTERM once it has written `metrics`; return (exit code, output)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "asft.cli", *cmd],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + timeout
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output
