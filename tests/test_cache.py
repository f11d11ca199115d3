"""The cached reference: the bucketed KL's math, the cache's storage and build, and training with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asft import fused
from asft.cache import ReferenceCache, reference_rows
from asft.cli import main
from asft.fused import LMHead, fused_loss_selected
from asft.objectives import MODES, CachedRows, bucketed_kl, kl_from_logprobs, needs_reference, token_loss
from conftest import cli_args

V, H = 389, 24


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    monkeypatch.setattr(fused.KERNELS, "compiled", False)


def batch(seed=0, n=23, device="cpu"):
    """Selected response rows: hidden [n, H], targets, batch rows (3 sequences), a policy head and a reference."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    rows = torch.tensor([0] * 7 + [1] * 11 + [2] * (n - 18))
    w = (torch.randn(V, H, generator=g) * 0.4).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).requires_grad_()
    ref_logits = h @ (torch.randn(V, H, generator=g) * 0.4).t() + torch.randn(V, generator=g)
    return h.to(device), y.to(device), rows.to(device), LMHead(w.to(device), b.to(device)), ref_logits.to(device)


def to_batch(x, rows):
    """[n, ...] selected rows (sorted by row) -> [B, T, ...]: select_response gives them back with labels_for."""
    counts = torch.bincount(rows)
    pos = torch.cat([torch.arange(c) for c in counts.tolist()]).to(x.device)
    out = torch.zeros(len(counts), int(counts.max()) + 1, *x.shape[1:], dtype=x.dtype, device=x.device)
    out[rows, pos] = x
    return out, pos


def labels_for(y, rows):
    out, pos = to_batch(y, rows)
    labels = torch.full(out.shape, -100, device=y.device)
    labels[rows, pos + 1] = y
    return labels


def loss_of(path, mode, h, y, rows, head, ref_logits=None, cached=None, **kw):
    """Loss, terms and gradients (hidden, weight, bias) through the naive path (full logits) or the fused one."""
    h = h.clone().requires_grad_()
    w, b = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    if path == "naive":
        ref = None if ref_logits is None else to_batch(ref_logits, rows)[0]
        loss, terms = token_loss(
            mode, to_batch(h @ w.t() + b, rows)[0], labels_for(y, rows), ref, ref_cache=cached, **kw
        )
    elif ref_logits is None:
        loss, terms = fused_loss_selected(mode, h, y, rows, LMHead(w, b), ref_cache=cached, chunk_size=5, **kw)
    else:  # an online reference whose lm_head gives exactly ref_logits: identity hidden rows, the logits as weight
        loss, terms = fused_loss_selected(
            mode,
            h,
            y,
            rows,
            LMHead(w, b),
            torch.eye(len(y), device=h.device),
            LMHead(ref_logits.t().contiguous()),
            chunk_size=5,
            **kw,
        )
    loss.backward()
    return loss.detach(), terms, [h.grad, w.grad, b.grad]


def close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


CASES = [
    (m, d, lvl)
    for m in MODES
    if needs_reference(m)
    for d in ("forward", "reverse")
    for lvl in (("sequence", "token") if m == "iw_sft" else ("sequence",))
] + [("sft", "forward", "sequence"), ("dft", "forward", "sequence")]


@pytest.mark.cuda_too
@pytest.mark.parametrize("path", ["naive", "fused"])
@pytest.mark.parametrize("mode,direction,level", CASES)
def test_cache_with_k_equal_vocabulary_is_the_online_reference(path, mode, direction, level, device):
    h, y, rows, head, ref_logits = batch(device=device)
    kw = dict(kl_weight=0.3, kl_direction=direction, iw_max=1.7, iw_level=level, num_items_in_batch=31)
    cached = reference_rows(ref_logits, y, V)  # every token in the top-k: no tail bucket
    assert cached.ids.shape == (len(y), V) and torch.isneginf(cached.tail).all()
    want_loss, want_terms, want_grads = loss_of(path, mode, h, y, rows, head, ref_logits, **kw)
    loss, terms, grads = loss_of(path, mode, h, y, rows, head, cached=cached, **kw)
    close(loss, want_loss)
    assert terms.keys() == want_terms.keys()
    for key in want_terms:
        assert terms[key] == pytest.approx(want_terms[key], rel=1e-5, abs=1e-6), key
    for g, want in zip(grads, want_grads):
        close(g, want)
    assert grads[1].abs().max() > 0


@pytest.mark.parametrize("path", ["naive", "fused"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize(
    "mode,rule",
    [
        ("prift", {}),  # PriFT's prior rho(y_t) from the cache's exact stored label log-prob
        ("prift", {"anchor": True, "weight_floor": 0.1}),
        ("eaft", {"anchor": True, "eaft_topk": 7}),
        ("dft", {"anchor": True, "weight_power": 0.5}),
    ],
)
def test_every_rule_with_a_cache_of_k_equal_vocabulary_is_the_online_reference(path, direction, mode, rule):
    h, y, rows, head, ref_logits = batch(1)
    kw = dict(kl_weight=0.3, kl_direction=direction, num_items_in_batch=31, **rule)
    cached = reference_rows(ref_logits, y, V)
    want_loss, want_terms, want_grads = loss_of(path, mode, h, y, rows, head, ref_logits, **kw)
    loss, terms, grads = loss_of(path, mode, h, y, rows, head, cached=cached, **kw)
    close(loss, want_loss)
    assert terms == pytest.approx(want_terms, rel=1e-5, abs=1e-6) and "kl" in terms
    for g, want in zip(grads, want_grads):
        close(g, want)


def independent_bucketed(z, cached: CachedRows, direction):
    """The k + 1 bucket distributions written out in float64, 1 - sum for the tail, KL by its definition."""
    z = z.double()
    pi = z.softmax(-1)
    rho_k = cached.logp.double().exp()
    pi_k = pi.gather(-1, cached.ids)
    p = torch.cat([rho_k, (1 - rho_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    q = torch.cat([pi_k, 1 - pi_k.sum(-1, keepdim=True)], -1)
    if direction == "reverse":
        p, q = q, p
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


@pytest.mark.cuda_too
@pytest.mark.parametrize("k", [1, 7, 60])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mode", ["sft_kl", "asft"])
def test_bucketed_kl_and_gradient_equal_an_independent_implementation(k, direction, mode, device):
    h, y, rows, head, ref_logits = batch(seed=k, device=device)
    cached = reference_rows(ref_logits, y, k)
    # The stored tail is the reference's mass outside the top-k, and the bucketed KL a lower bound of the full KL.
    rho = ref_logits.double().softmax(-1)
    close(cached.tail.double().exp(), 1 - rho.gather(-1, cached.ids).sum(-1), 1e-5)
    z = (h @ head.weight.t() + head.bias).detach()
    kl_b = bucketed_kl(z.log_softmax(-1), cached, direction)
    close(kl_b.double(), independent_bucketed(z, cached, direction), 1e-5)
    full = kl_from_logprobs(z.log_softmax(-1), ref_logits.log_softmax(-1), direction)
    assert (kl_b <= full + 1e-6).all() and (kl_b < full - 1e-4).any()

    # The loss and gradients of the naive path (autograd) and the fused one (closed form) against float64 autograd.
    hh, w, b = (t.detach().double().requires_grad_() for t in (h, head.weight, head.bias))
    logits = hh @ w.t() + b
    logp_y = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    weight = logp_y.detach().exp() if mode == "asft" else 1.0
    want = (-weight * logp_y + 0.4 * independent_bucketed(logits, cached, direction)).sum() / 29
    want.backward()
    for path in ("naive", "fused"):
        loss, terms, grads = loss_of(
            path, mode, h, y, rows, head, cached=cached, kl_weight=0.4, kl_direction=direction, num_items_in_batch=29
        )
        close(loss.double(), want.detach())
        assert terms["kl"] == pytest.approx(float(kl_b.mean()), rel=1e-5)
        for g, ref in zip(grads, (hh.grad, w.grad, b.grad)):
            close(g.double(), ref)


@pytest.mark.cuda_too
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_fused_cached_gradient_follows_a_logit_scale_and_softcap(direction, device):
    # The fused cached kernels handle the top-k entries apart from the rest of the vocabulary (the tail's
    # log-sum-exp, the gradient's correction on K): both must see the finished logits cap * tanh(scale * a / cap).
    h, y, rows, head, ref_logits = batch(seed=3, device=device)
    cached, scale, cap = reference_rows(ref_logits, y, 7), 0.7, 2.5
    hh, w, b = (t.detach().double().requires_grad_() for t in (h, head.weight, head.bias))
    logits = torch.tanh((hh @ w.t() + b) * scale / cap) * cap
    logp_y = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    want = (-logp_y.detach().exp() * logp_y + 0.4 * independent_bucketed(logits, cached, direction)).sum() / 29
    want.backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, head.weight, head.bias))
    loss, _ = fused_loss_selected(
        "asft",
        h2,
        y,
        rows,
        LMHead(w2, b2, logit_scale=scale, softcap=cap),
        ref_cache=cached,
        chunk_size=5,
        kl_weight=0.4,
        kl_direction=direction,
        num_items_in_batch=29,
    )
    loss.backward()
    close(loss.double(), want.detach())
    for g, ref in zip((h2.grad, w2.grad, b2.grad), (hh.grad, w.grad, b.grad)):
        close(g.double(), ref)


@pytest.mark.cuda_too
def test_iw_sft_uses_the_stored_label_log_prob_exactly(device):
    h, y, rows, head, ref_logits = batch(device=device)
    cached = reference_rows(ref_logits, y, 4)  # a small k: the labels are mostly outside the top-k
    online = loss_of("fused", "iw_sft", h, y, rows, head, ref_logits, iw_max=3.0)
    with_cache = loss_of("fused", "iw_sft", h, y, rows, head, cached=cached, iw_max=3.0)
    close(with_cache[0], online[0])
    assert with_cache[1]["mean_weight"] == pytest.approx(online[1]["mean_weight"], rel=1e-5)


# ------------------------------------------------------------------------------------- building and training


def write_data(path: Path, n=12, seed=0, change=None):
    words = "the quick brown fox jumps over the lazy dog patient doctor heart blood disease treatment".split()
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))  # noqa: E731
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": pick(2 + i % 4), "completion": pick(1 + (i * 5) % 9)}
            if change == i:
                row["completion"] += " changed"
            f.write(json.dumps(row) + "\n")
    return path


def build_argv(model_dir, data, out, k, *extra):
    return [
        *cli_args(
            "cache-reference",
            *"--shard_size 5 --batch_size 3 --disable_tqdm".split(),
            model_name_or_path=model_dir,
            data_path=data,
            output_dir=out,
            top_k=k,
        ),
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cache")
    data = write_data(root / "data.jsonl")
    full = root / "full"  # k = V, float32: the online reference exactly
    assert main(build_argv(tiny_model_dir, data, full, 10_000, "--dtype", "float32")) == 0
    return {"root": root, "data": data, "full": full}


def train_argv(model_dir, data, out, *extra):
    return [
        *cli_args(
            "train",
            *(
                "--mode asft --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_steps 3"
                " --optim sgd --max_grad_norm 0 --lr_scheduler_type constant --learning_rate 20 --kl_weight"
                " 0.5 --save_strategy no --logging_steps 1 --use_cpu true --fused_chunk_size 7 --seed 0"
                " --disable_tqdm true --report_to none"
            ).split(),
            model_name_or_path=model_dir,
            data_path=data,
            output_dir=out,
        ),
        *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors"
    return load_file(folder / name)


def assert_same_weights(a, b, start=None):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    if start is not None:  # not vacuous: training moved the weights far more than the tolerance
        assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 1e-2


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_training_with_a_full_cache_equals_the_online_reference(built, tiny_model_dir, tmp_path, impl):
    # Shuffled data, two accumulation steps: each batch must find its own examples' rows.
    extra = ["--loss_implementation", impl]
    assert main(train_argv(tiny_model_dir, built["data"], tmp_path / "online", *extra)) == 0
    assert (
        main(
            train_argv(
                tiny_model_dir, built["data"], tmp_path / "cached", *extra, "--reference_cache", str(built["full"])
            )
        )
        == 0
    )
    assert_same_weights(weights(tmp_path / "cached"), weights(tmp_path / "online"), weights(tiny_model_dir))
    logs = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kl", 0) > 1e-6 for r in logs)


def test_lora_with_a_cache_loads_no_reference_and_never_disables_the_adapter(
    built, tiny_model_dir, tmp_path, monkeypatch
):
    from peft import PeftModel

    import asft.training.trainer

    lora = ["--use_lora", "--lora_dropout", "0", "--lora_target_modules", "q_proj,v_proj"]
    torch.manual_seed(0)
    assert main(train_argv(tiny_model_dir, built["data"], tmp_path / "online", *lora)) == 0

    def refuse(*a, **k):
        raise AssertionError("a reference model or the adapter-disabled base was used")

    monkeypatch.setattr(PeftModel, "disable_adapter", refuse)
    monkeypatch.setattr(asft.training.trainer, "load_frozen_copy", refuse)
    seen = {}
    original = asft.training.trainer.AnchoredSFTTrainer.train

    def record(self, *a, **k):
        seen.update(ref_model=self.ref_model, reference=type(self.reference).__name__)
        return original(self, *a, **k)

    monkeypatch.setattr(asft.training.trainer.AnchoredSFTTrainer, "train", record)
    torch.manual_seed(0)
    assert (
        main(
            train_argv(
                tiny_model_dir, built["data"], tmp_path / "cached", *lora, "--reference_cache", str(built["full"])
            )
        )
        == 0
    )
    assert seen == {"ref_model": None, "reference": "CachedReference"}
    assert_same_weights(weights(tmp_path / "cached"), weights(tmp_path / "online"))


def test_resuming_with_a_cache_gives_the_uninterrupted_weights(built, tiny_model_dir, tmp_path):
    cache = [
        "--reference_cache",
        str(built["full"]),
        "--max_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
    ]
    assert main(train_argv(tiny_model_dir, built["data"], tmp_path / "whole", *cache)) == 0
    assert (
        main(
            train_argv(
                tiny_model_dir,
                built["data"],
                tmp_path / "resumed",
                *cache,
                "--resume_from_checkpoint",
                str(tmp_path / "whole" / "checkpoint-2"),
            )
        )
        == 0
    )
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "whole"), weights(tiny_model_dir))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"data": 3}, "example 3 ("),
        ({"template": "none"}, "field 'template'"),
        ({"max_length": "64"}, "field 'max_length'"),
    ],
)
def test_a_cache_of_other_data_or_settings_is_refused_before_training(
    built, tiny_model_dir, tmp_path, capsys, change, field
):
    data = built["data"]
    extra = []
    if "data" in change:
        data = write_data(tmp_path / "other.jsonl", change=change["data"])
    if "template" in change:
        extra += ["--template", change["template"]]
    if "max_length" in change:
        extra += ["--model_max_length", change["max_length"]]
    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, data, out, *extra, "--reference_cache", str(built["full"]))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    if "data" in change:
        assert f"{data}:4" in err and "input_ids" in err  # the example named by file and line
    assert not (out / "metrics.jsonl").exists()


def test_an_interrupted_build_continues_into_an_identical_cache(built, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import asft.cache

    argv = build_argv(tiny_model_dir, built["data"], tmp_path / "cut", 10_000, "--dtype", "float32")
    write_shard = asft.cache.store._write_shard
    calls = []

    def interrupted(out, index, *a):
        calls.append(index)
        if len(calls) == 2:  # the second shard dies half-written
            (out / f".shard-{index:05d}.tmp-1").mkdir()
            (out / f".shard-{index:05d}.tmp-1" / "ids.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        return write_shard(out, index, *a)

    monkeypatch.setattr(asft.cache.store, "_write_shard", interrupted)
    assert main(argv) == 130  # one line: the finished shards are kept
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(Exception, match="unfinished build"):
        ReferenceCache(tmp_path / "cut")
    monkeypatch.setattr(asft.cache.store, "_write_shard", lambda *a: (calls.append(a[1]), write_shard(*a)))
    capsys.readouterr()
    assert main(argv) == 0
    assert calls[2:] == [1, 2]  # shard 0 was not recomputed
    assert "Built 2 shard(s) here, reused 1 already built" in capsys.readouterr().out
    assert main(argv) == 0  # a complete cache: nothing to compute, and it says so
    assert "already complete (3 shard(s) here): nothing computed" in capsys.readouterr().out
    assert calls[4:] == []
    files = lambda root: {
        p.relative_to(root).as_posix(): p.read_bytes()  # noqa: E731
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    assert files(tmp_path / "cut") == files(built["full"])


def test_inspect_and_a_small_k_cache(built, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "k8"
    assert main(build_argv(tiny_model_dir, built["data"], out, 8)) == 0  # float16 by default
    capsys.readouterr()
    assert main(["cache-reference", "--inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    small, full = ReferenceCache(out), ReferenceCache(built["full"])
    tail = torch.cat([small.rows([i]).tail for i in range(len(small))]).exp()
    assert f"mean tail mass {float(tail.mean()):.4g}" in printed and "bytes/token 40.0" in printed  # 8 x (2 + 2) + 8
    # The stored top-8 are the full cache's first 8 (float16-rounded), the label log-probs identical.
    a, b = small.rows(range(len(small))), full.rows(range(len(full)))
    assert torch.equal(a.ids, b.ids[:, :8]) and torch.equal(a.label, b.label)
    torch.testing.assert_close(a.logp, b.logp[:, :8], rtol=1e-3, atol=1e-3)
    close(a.tail.exp(), 1 - b.logp[:, :8].exp().sum(-1), 1e-4)


def test_vllm_backend_without_vllm_or_gpu_is_a_clear_error(built, tiny_model_dir, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vllm and a GPU are here: the agreement test below runs instead")
    assert main(build_argv(tiny_model_dir, built["data"], tmp_path / "v", 8, "--backend", "vllm")) == 2
    err = capsys.readouterr().err
    assert "--backend vllm needs" in err and "--backend hf" in err


def test_vllm_backend_agrees_with_hf(built, tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vllm and a CUDA GPU")
    out = tmp_path / "vllm"
    assert main(build_argv(tiny_model_dir, built["data"], out, 8, "--backend", "vllm", "--dtype", "float32")) == 0
    hf_out = tmp_path / "hf"
    assert main(build_argv(tiny_model_dir, built["data"], hf_out, 8, "--dtype", "float32")) == 0
    a, b = ReferenceCache(out), ReferenceCache(hf_out)
    ra, rb = a.rows(range(len(a))), b.rows(range(len(b)))
    torch.testing.assert_close(ra.logp, rb.logp, rtol=0, atol=2e-3)
    torch.testing.assert_close(ra.label, rb.label, rtol=0, atol=2e-3)
    assert (ra.ids == rb.ids).float().mean() > 0.95  # near-ties may swap places between kernels


def test_the_trainer_checks_the_cache_itself(built, tokenizer, tmp_path):
    """Used as a library (no CLI): another policy is warned about, a changed example is refused before training."""
    from asft import AnchoredSFTConfig, AnchoredSFTTrainer
    from asft.cache import CacheMismatchError
    from asft.data import build_dataset
    from conftest import build_model

    quiet = dict(report_to="none", use_cpu=True, save_strategy="no")
    args = AnchoredSFTConfig(
        output_dir=str(tmp_path / "lib"), mode="asft", max_steps=1, reference_cache=str(built["full"]), **quiet
    )
    data = build_dataset(str(built["data"]), tokenizer, template="chat", max_length=args.max_length)
    with pytest.warns(UserWarning, match="is not the model being trained"):
        trainer = AnchoredSFTTrainer(
            build_model(tokenizer, seed=1), args=args, train_dataset=data, processing_class=tokenizer
        )
    assert trainer.ref_model is None and type(trainer.reference).__name__ == "CachedReference"
    other = build_dataset(
        str(write_data(tmp_path / "other.jsonl", change=5)), tokenizer, template="chat", max_length=args.max_length
    )
    with pytest.raises(CacheMismatchError, match=r"example 5: field .input_ids."):
        AnchoredSFTTrainer(build_model(tokenizer, seed=0), args=args, train_dataset=other, processing_class=tokenizer)


@pytest.mark.parametrize("damage", ["manifest", "truncated", "deleted"])
def test_a_damaged_cache_is_one_line_naming_the_file_before_training(built, tiny_model_dir, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built["full"], cache)
    shard = sorted(p for p in cache.iterdir() if p.is_dir())[1]
    if damage == "manifest":
        bad = cache / "manifest.json"
        bad.write_text(bad.read_text()[:50])
    elif damage == "truncated":
        bad = shard / "logp.npy"
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad = shard / "ids.npy"
        bad.unlink()
    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, built["data"], out, "--reference_cache", str(cache))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "--overwrite" in err, err
    assert not (out / "metrics.jsonl").exists()
