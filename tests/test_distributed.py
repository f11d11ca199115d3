"""Several processes give the same training as one; the shipped launch presets parse and validate.

Two-process runs on CPU (gloo), started by the real launchers around the real `asft train`:
- `accelerate launch --config_file <ddp preset> --num_processes 2`  (DDP)
- `deepspeed --num_gpus 2 ... --deepspeed_config ds_zero3_bf16`     (the paper's launcher; ZeRO-3, the reference
  sharded, the lm_heads gathered for the fused loss)
- FSDP2 (accelerate refuses FSDP on CPU, so a script runs accelerate's own FSDP2 wrapping on a CPU mesh, in the
  DDP run's two processes)
and compared with one process holding the whole global batch (2 ranks x 2 examples = 1 x 4, two accumulation
steps, three SGD steps). The launches run concurrently: ~110 s of CPU, 60-90 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asft.cli.launch import launch_argv, presets, resolve_preset
from asft.errors import ConfigError

MODES = {  # DFT's weight pi(y) ~ 1/V on a random model makes asft's step ~V times smaller: a larger lr moves it
    "sft": ["--mode", "sft", "--learning_rate", "0.5"],
    "asft": ["--mode", "asft", "--learning_rate", "20", "--kl_weight", "0.5"],
    "lora": ["--mode", "asft", "--learning_rate", "20", "--kl_weight", "0.5", "--use_lora", "--lora_dropout", "0"],
    # The cached reference with k = V (float32): no reference model; must train exactly as asft does.
    "cached": ["--mode", "asft", "--learning_rate", "20", "--kl_weight", "0.5", "--reference_cache", "CACHE"],
    # Rules beyond DFT: EAFT's top-k entropy of the live policy (no reference; w ~ 1 on a random model, sft's lr) and
    # anchored PriFT (the reference's p(y) ~ 1/V on a random model: asft's lr).
    "eaft": ["--mode", "eaft", "--eaft_topk", "5", "--learning_rate", "0.5"],
    "prift": ["--mode", "prift", "--anchor", "--learning_rate", "20"],
}

WORKER = r'''
"""Run `asft train` once per JSON argv list, in one process, as a launcher started it; record the reference."""
import json, os, sys
if os.environ.get("ASFT_TEST_DEEPSPEED_CPU"):
    import deepspeed, deepspeed.comm.torch
    deepspeed.comm.torch.build_shm_op = lambda: None  # a JIT C++ build of minutes; gloo runs the same collectives
    # On GPUs accelerate starts deepspeed.comm itself under the deepspeed launcher; with use_cpu it only starts
    # torch.distributed, and ZeRO-3's loader would take the world for one process.
    deepspeed.init_distributed(dist_backend="gloo")
import torch
from asft.cli import main
from asft.training.trainer import AnchoredSFTTrainer

train = AnchoredSFTTrainer.train

def record_reference(self, *args, **kwargs):
    ref = self.ref_model
    if ref is not None:
        params = list(ref.parameters())
        info = {"type": type(ref).__name__, "training": getattr(ref, "module", ref).training,
                "requires_grad": any(p.requires_grad for p in params),
                "optimizer": type(getattr(ref, "optimizer", None)).__name__,
                "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)}
        path = os.path.join(self.args.output_dir, f"reference-rank{os.environ.get('RANK', '0')}.json")
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(info, f)
    return train(self, *args, **kwargs)

AnchoredSFTTrainer.train = record_reference
launcher_args = sys.argv[1:-1]  # the deepspeed launcher's --local_rank=N comes first
for argv in json.loads(sys.argv[-1]):
    torch.manual_seed(0)  # LoRA's A matrices: the same initialisation in every run
    command = argv if argv[0] == "cache-reference" else ["train", *argv]
    assert main([*launcher_args, *command]) == 0  # exactly how `python -m asft.cli` receives them
if os.environ.get("ASFT_TEST_FSDP_CHECK"):  # reuses these two processes (and their gloo group): no new launch
    import traceback
    try:
        exec(open(os.environ["ASFT_TEST_FSDP_CHECK"]).read())
    except Exception:  # reported in the log for the FSDP test, without failing the run above
        traceback.print_exc()
# Left to interpreter exit, gloo's threads were once torn down mid-flight ("terminate called without an active
# exception") after every check had passed: the group goes first, explicitly.
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
'''

FSDP_CHECK = r'''
"""One fused asft step under FSDP2 (accelerate's own wrapping, on a CPU mesh) gives the single-process gradient."""
import os, sys, types
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from conftest import build_model, build_tokenizer
from asft.fused import lm_head_of
from asft.training.reference import FrozenModelReference, full_heads, prepare_reference
from asft.training.reference import add_fused_forward as _add_fused_forward
from asft.training.trainer import fused_loss_fn

rank, world = dist.get_rank(), dist.get_world_size()
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                        auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False)
# accelerate only builds FSDP on an accelerator; its FSDP2 wrapping runs on a CPU mesh given what it reads.
acc = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), distributed_type=DistributedType.FSDP,
                            device=torch.device("cpu"), mixed_precision="no", is_main_process=rank == 0)
tok = build_tokenizer()
ids = torch.randint(5, len(tok) - 5, (4, 12), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
labels[:, :4] = -100
n_global = int((labels[:, 1:] != -100).sum())
mine = slice(2 * rank, 2 * rank + 2)

def make(seed, tie, frozen=False):
    model = build_model(tok, seed=seed, tie=tie)
    _add_fused_forward(model)
    return model.requires_grad_(not frozen)

def step(policy, ref, ids, labels, scale):
    reference = FrozenModelReference(ref)
    loss_fn = fused_loss_fn("asft", labels, reference.hidden({"input_ids": ids}), reference.head(), kl_weight=0.5,
                            num_items_in_batch=n_global, chunk_size=5)  # the trainer's own
    loss, _ = policy(input_ids=ids, asft_loss_fn=loss_fn)
    (loss * scale).backward()  # FSDP averages over ranks: the trainer's x num_processes

for tie in (False, True):
    # A reference that differs from the policy, so that the KL gradient is not zero.
    single, single_ref = make(1, tie), make(2, tie, frozen=True)
    step(single, single_ref, ids, labels, 1)
    policy = fsdp2_prepare_model(acc, make(1, tie))
    ref = prepare_reference(make(2, tie, frozen=True), acc)
    layer = ref.model.layers[0].self_attn.q_proj.weight
    assert isinstance(layer, DTensor) and layer.to_local().numel() * world == layer.numel(), "reference not sharded"
    assert not ref.training
    if not tie:  # before any forward the heads are still DTensors: a frozen one is gathered, a trainable one refused
        with full_heads(lm_head_of(ref)) as (head,):
            assert torch.equal(head.weight, single_ref.lm_head.weight)
        try:
            with full_heads(lm_head_of(policy)):
                raise AssertionError("a trainable sharded head was accepted")
        except NotImplementedError:
            pass
    step(policy, ref, ids[mine], labels[mine], world)
    want = dict(single.named_parameters())
    for name, p in policy.named_parameters():
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(got, want[name].grad, rtol=1e-4, atol=1e-7, msg=name)
print(f"rank {rank}: FSDP2 gradients equal", flush=True)
'''


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now, below the kernel's ephemeral range (32768 and up here): a port the kernel hands
    out (bind to 0) can be handed out again, to another launch or to one of gloo's own connections, before the
    launcher that was given it binds it, seconds later."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _train_argv(model_dir, data, out, batch):
    common = [
        "--model_name_or_path",
        str(model_dir),
        "--data_path",
        str(data),
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "3",
        "--optim",
        "sgd",
        "--max_grad_norm",
        "0",
        "--lr_scheduler_type",
        "constant",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--use_cpu",
        "true",
        "--fused_chunk_size",
        "7",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
    ]
    return {
        mode: common
        + [str(out.parent / "cache") if a == "CACHE" else a for a in extra]
        + ["--output_dir", str(out / mode)]
        for mode, extra in MODES.items()
    }


def _cache_argv(model_dir, data, out):
    return [
        "cache-reference",
        "--model_name_or_path",
        str(model_dir),
        "--data_path",
        str(data),
        "--top_k",
        "100000",
        "--dtype",
        "float32",
        "--shard_size",
        "5",
        "--batch_size",
        "3",
        "--disable_tqdm",
        "--output_dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Output folders of the single-process, DDP and ZeRO-3 runs (three modes each) and the FSDP2 check's log."""
    root = tmp_path_factory.mktemp("distributed")
    words = "the quick brown fox jumps over the lazy dog patient doctor heart blood disease treatment".split()
    g = torch.Generator().manual_seed(0)
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))  # noqa: E731
    with (root / "data.jsonl").open("w") as f:  # uneven lengths: ranks hold different numbers of tokens
        for i in range(32):
            f.write(json.dumps({"prompt": pick(2 + i % 4), "completion": pick(1 + (i * 5) % 9)}) + "\n")
    (root / "worker.py").write_text(WORKER)
    (root / "fsdp_check.py").write_text(FSDP_CHECK)
    # CPU and gloo even where GPUs exist; no torch.compile (the kernels' compilation is not what is tested here).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ASFT_COMPILE": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
    }

    from asft.cli import main

    # The cache the "cached" runs read, built here by one process; the DDP launch builds it again, two processes
    # sharing the shards, into cache-ddp (compared byte for byte).
    assert main(_cache_argv(tiny_model_dir, root / "data.jsonl", root / "cache")) == 0

    def args_json(name, batch):
        runs = list(_train_argv(tiny_model_dir, root / "data.jsonl", root / name, batch).values())
        if name == "ddp":
            runs.insert(0, _cache_argv(tiny_model_dir, root / "data.jsonl", root / "cache-ddp"))
        return json.dumps(runs)

    worker = str(root / "worker.py")
    ddp_port, zero3_port = _free_ports(2)
    commands = {
        "single": ([sys.executable, worker, args_json("single", 4)], env),
        "ddp": (
            [
                _bin("accelerate"),
                "launch",
                "--config_file",
                resolve_preset("ddp", "accelerate"),
                "--num_processes",
                "2",
                "--main_process_port",
                str(ddp_port),
                worker,
                args_json("ddp", 2),
            ],
            {
                **env,
                "ASFT_TEST_FSDP_CHECK": str(root / "fsdp_check.py"),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
            },
        ),
        "zero3": (
            [
                _bin("deepspeed"),
                "--num_gpus",
                "2",
                "--master_port",
                str(zero3_port),
                worker,
                args_json("zero3", 2).replace(
                    '"--use_cpu", "true"', '"--use_cpu", "true", "--deepspeed_config", "ds_zero3_bf16"'
                ),
            ],
            {**env, "ASFT_TEST_DEEPSPEED_CPU": "1"},
        ),
    }
    # Concurrently: each launch spends most of its time importing and starting up, on 2 cores.
    procs = {
        name: subprocess.Popen(
            cmd,
            env=e,
            cwd=root,
            stdout=(root / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name, (cmd, e) in commands.items()
    }
    deadline = time.time() + 600
    for _name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    logs = {name: (root / f"{name}.log").read_text() for name in procs}
    return {"root": root, "rc": {n: p.returncode for n, p in procs.items()}, "logs": logs}


def _check_ran(runs, name):
    assert runs["rc"][name] == 0, f"{name} run failed:\n" + runs["logs"][name][-6000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors")
    return {k: v.float() for k, v in load_file(file).items()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_processes_train_exactly_like_one(runs, engine, mode, tiny_model_dir):
    _check_ran(runs, "single")
    _check_ran(runs, engine)
    one, two = _weights(runs["root"] / "single" / mode), _weights(runs["root"] / engine / mode)
    assert one.keys() == two.keys()
    # Float32 sums taken in another order (an all-reduce of two halves vs one sum) differ by a few ulps: <= 1.2e-7
    # on these weights after three steps (measured). Normalising by each rank's own tokens instead of the step's
    # (--average_tokens_across_devices false) moves them by 3e-4 (LoRA) to 4e-3 (measured): far outside 1e-6.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{engine} {mode} {name}")
    if mode != "lora":  # not vacuous: the weights moved far more than the tolerance
        start = _weights(Path(tiny_model_dir))
        assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-2
    # The logged metrics are global too (every rank's tokens), and asft's KL anchor was active.
    last = [
        json.loads((runs["root"] / r / mode / "metrics.jsonl").read_text().splitlines()[-2]) for r in ("single", engine)
    ]
    for key in ("loss", "nll", "kl"):
        if key in last[0]:
            assert last[1][key] == pytest.approx(last[0][key], rel=1e-4, abs=1e-7), key
    if mode not in ("sft", "eaft"):  # eaft: no reference, no kl
        assert last[0]["kl"] > 1e-6
    if mode == "cached":  # k = V: the cache is the online reference exactly
        asft = _weights(runs["root"] / engine / "asft")
        for name in asft:
            torch.testing.assert_close(two[name], asft[name], rtol=1e-5, atol=1e-6, msg=f"{engine} cached {name}")


def test_a_two_process_cache_build_is_the_one_process_build(runs):
    _check_ran(runs, "ddp")
    files = lambda root: {
        p.relative_to(root).as_posix(): p.read_bytes()  # noqa: E731
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    one, two = files(runs["root"] / "cache"), files(runs["root"] / "cache-ddp")
    assert len(one) > 5 and one.keys() == two.keys()
    for name in one:  # the manifests name their own folders nowhere: identical bytes
        assert one[name] == two[name], name


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_frozen_reference_is_prepared_like_the_policy(runs, engine, tiny_model_dir):
    _check_ran(runs, engine)
    total = sum(p.numel() for p in _weights(Path(tiny_model_dir)).values())
    for rank in (0, 1):
        info = json.loads((runs["root"] / engine / "asft" / f"reference-rank{rank}.json").read_text())
        assert not info["training"] and not info["requires_grad"], info
        # No optimizer, or ZeRO-3's parameter-partitioning hooks (DeepSpeedZeRoOffload): no optimizer state.
        assert info["optimizer"] in ("NoneType", "DeepSpeedZeRoOffload"), info
        if engine == "zero3":  # a DeepSpeed engine holding this rank's half of every weight, no full copy
            assert info["type"] == "DeepSpeedEngine" and info["local_numel"] <= total / 2 + 64, (info, total)
        else:  # DDP: a plain replica on each rank, no wrapper
            assert info["type"] == "LlamaForCausalLM" and info["local_numel"] == total, (info, total)


def test_fsdp2_shards_the_reference_and_keeps_the_fused_gradient_exact(runs):
    _check_ran(runs, "ddp")  # the check runs in the DDP run's two processes, after its training runs
    assert runs["logs"]["ddp"].count("FSDP2 gradients equal") == 2, runs["logs"]["ddp"][-6000:]


# ------------------------------------------------------------------------------------------------ presets


def test_presets_are_shipped_and_resolved_by_name_or_path(tmp_path):
    assert set(presets("accelerate")) == {"ddp", "fsdp", "zero2", "zero3"}
    assert set(presets("deepspeed")) == {"ds_zero2_bf16", "ds_zero3_bf16"}
    zero3 = resolve_preset("zero3", "accelerate")
    assert Path(zero3).is_file() and resolve_preset("zero3.yaml", "accelerate") == zero3
    assert Path(resolve_preset("ds_zero2_bf16.json", "deepspeed")).name == "ds_zero2_bf16.json"
    mine = tmp_path / "mine.yaml"
    mine.write_text("distributed_type: MULTI_GPU\n")
    assert resolve_preset(str(mine), "accelerate") == str(mine)
    for argv in (["--accelerate_config", "zero3"], ["--accelerate_config=zero3"]):
        assert launch_argv([*argv, "--num_processes", "8", "train", "--mode", "asft"]) == [
            "--config_file",
            zero3,
            "--num_processes",
            "8",
            "-m",
            "asft.cli",
            "train",
            "--mode",
            "asft",
        ]
    assert launch_argv(["--accelerate_config", str(mine), "train"])[:2] == ["--config_file", str(mine)]
    # The repository's configs/ holds the same files (one source of truth).
    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    if repo_configs.exists():
        assert {p.name for p in repo_configs.iterdir()} >= {p.name for p in presets().values()}


@pytest.mark.parametrize(
    "value, kind, field, hint",
    [
        ("zero4", "accelerate", "accelerate_config", "ddp, fsdp, zero2, zero3"),
        ("zero3", "deepspeed", "deepspeed_config", "zero3 is an accelerate preset"),
        ("scripts/ds_zero2_bf16.json", "deepspeed", "deepspeed_config", "ds_zero2_bf16, ds_zero3_bf16"),
    ],
)
def test_unknown_preset_names_the_field_and_lists_the_presets(value, kind, field, hint):
    with pytest.raises(ConfigError, match=field) as e:
        resolve_preset(value, kind, field)
    assert hint in str(e.value) and value in str(e.value)


def _launch_env(name):
    """The environment `accelerate launch --config_file <preset>` gives each process, built by accelerate itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = launch_argv(["--accelerate_config", name, "--num_processes", "2", "train", "--mode", "asft"])
    args = launch_command_parser().parse_args(argv)
    assert (
        args.module and args.training_script == "asft.cli" and args.training_script_args == ["train", "--mode", "asft"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, prepare_multi_gpu_env(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    return args, prepare_deepspeed_cmd_env(args)[1]


def _validated_deepspeed_config(config, tiny_model_dir, tmp_path):
    """Fill the "auto" values as transformers does, then validate with DeepSpeed's own config class."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from asft import AnchoredSFTConfig

    args = AnchoredSFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        bf16=True,
        use_cpu=True,
        report_to="none",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # its hidden size fills the bucket sizes
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    try:  # (constructing it marks DeepSpeed active process-wide until unset)
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, 10)
        filled = hf.config
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(filled), f"a value transformers does not fill: {filled}"
    assert filled["bf16"]["enabled"] is True and filled["gradient_accumulation_steps"] == 4
    DeepSpeedConfig(filled)
    return filled


def test_deepspeed_is_installed():
    # Not a skip: the presets and the ZeRO-3 run above must be checked in CI (pip install "asft[deepspeed]").
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"deepspeed does not import ({type(e).__name__}: {e}); pip install 'asft[deepspeed]'")


@pytest.mark.parametrize("name", ["ds_zero2_bf16", "ds_zero3_bf16"])
def test_deepspeed_json_presets_validate(name, tiny_model_dir, tmp_path):
    config = json.loads(Path(resolve_preset(name, "deepspeed")).read_text())
    filled = _validated_deepspeed_config(config, tiny_model_dir, tmp_path)
    assert filled["zero_optimization"]["stage"] == int(name[len("ds_zero")])


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_accelerate_presets_parse(name, tiny_model_dir, tmp_path):
    from unittest import mock

    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    args, env = _launch_env(name)
    assert env.get("ACCELERATE_MIXED_PRECISION") == "no"  # precision comes from asft train's --bf16
    with mock.patch.dict(os.environ, env):  # the plugins read the launcher's environment, as in each process
        if name == "fsdp":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
            assert plugin.auto_wrap_policy is not None  # one unit per decoder layer
        elif name != "ddp":
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision("bf16")  # what TrainingArguments does with `asft train --bf16`
            assert plugin.zero_stage == int(name[-1]) and plugin.zero3_init_flag == (name == "zero3")
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    elif name != "fsdp":
        _validated_deepspeed_config(plugin.deepspeed_config, tiny_model_dir, tmp_path)


# ------------------------------------------------------------------------------------------- command line


def test_launcher_arguments_parse(monkeypatch):
    from asft.cli.train import _derived_flags, parse_train_args

    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "unused", "--use_cpu", "true"]
    script, config = parse_train_args(base + ["--local_rank=0"])  # what the deepspeed launcher appends
    assert config.local_rank == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _derived_flags(
        base
        + ["--deepspeed_config", "ds_zero3_bf16", "--global_batch_size", "16", "--per_device_train_batch_size", "2"]
    ) == ["--deepspeed", resolve_preset("ds_zero3_bf16", "deepspeed"), "--gradient_accumulation_steps", "4"]
    with pytest.raises(ConfigError, match="deepspeed_config"):
        _derived_flags(base + ["--deepspeed_config", "zero9"])


def test_asft_runs_as_a_module_and_prints_preset_paths():
    run = subprocess.run([sys.executable, "-m", "asft.cli", "config-path", "zero3"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == resolve_preset("zero3", "accelerate"), run.stderr
