"""The cached reference distribution: the reference's top-k log-probs per response token, computed once over the
training set, stored on disk (memory-mapped) and read back every epoch, so that training loads no reference model.

Layout of a cache folder:

    build.json          what the cache is built from (model / tokenizer fingerprints, template, max length, k,
                        dtype, each example's token-id fingerprint and origin); written first, checked on resume
    shard-00000/ ...    one folder per `shard_size` consecutive examples: ids.npy [n, k] (uint16 or int32),
                        logp.npy [n, k] (float16 | bfloat16 bits | float32), tail.npy [n] (log rho_T, float32),
                        label.npy [n] (log rho(y_t), float32), offsets.npy [examples + 1] (int64)
    manifest.json       build.json plus the shard table; written last, by one process, once every shard exists

A shard is written into a temporary folder and renamed when complete, so an interrupted build never leaves a
shard that looks complete; a resumed build recomputes only the missing shards, and (same batches, same code) gives
the same bytes. Under `accelerate launch` each process builds the shards s with s % world_size == rank.

Per response token t (the positions `objectives.select_response` keeps, in the same order) the cache holds the
top-k ids and log-probabilities, log rho(y_t) of the label, and log rho_T = log sum over the complement of the
top-k (a log-sum-exp, never log(1 - sum)). The KL taken from it is `objectives.bucketed_kl`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CacheMismatchError, ConfigError
from ..io import write_json
from ..objectives import CachedRows, log_complement

FORMAT = "asft-reference-cache"

VERSION = 1

STORE_DTYPES = ("float16", "bfloat16", "float32")

EXAMPLE_COLUMN = "asft_example"  # the stable example index the trainer carries through its dataset and collator

TRUNCATION = "keep_start"  # build_dataset cuts examples to max_length from the right

_UNSET = object()


def example_fingerprint(input_ids, labels) -> str:
    """A fingerprint of one example's token ids and labels (what the trainer sees after tokenization)."""
    h = hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalisation and special tokens (the fast tokenizer's JSON), and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(
        json.dumps(
            [
                getattr(tokenizer, "chat_template", None),
                str(tokenizer.eos_token),
                str(tokenizer.bos_token),
                bool(getattr(tokenizer, "add_bos_token", False)),
            ]
        ).encode()
    )
    return h.hexdigest()[:20]


def model_fingerprint(model) -> str:
    """The model's config and weights: every tensor's name, shape, dtype and 4096 evenly spaced values.

    Sampling keeps this a second on large models; any fine-tuning moves every sampled value.
    """
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def reference_rows(ref_logits: torch.Tensor, targets: torch.Tensor, k: int) -> CachedRows:
    """What the cache stores for n response tokens, from the reference's logits [n, V] (float32 math)."""
    logp = torch.log_softmax(ref_logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    top = logp.topk(k, dim=-1, sorted=True)
    tail = log_complement(logp, top.indices) if k < logp.shape[-1] else torch.full_like(logp[:, 0], float("-inf"))
    label = logp.gather(-1, targets[:, None]).squeeze(-1)
    return CachedRows(top.indices, top.values, tail, label)


def _to_store(logp: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits as int16
        return logp.to(torch.bfloat16).view(torch.int16).numpy()
    return logp.to(getattr(torch, dtype)).numpy()


def _from_store(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16).float() if dtype == "bfloat16" else t.float()


def ids_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def build_plan(
    dataset,
    *,
    tokenizer,
    reference: dict,
    template: str,
    max_length: int | None,
    data: list[str],
    top_k: int,
    dtype: str,
    vocab_size: int,
    shard_size: int,
    backend: str,
) -> dict:
    """Everything the cache is built from (build.json): settings, fingerprints and each example's origin."""
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype: unknown value {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
    if top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {top_k}")
    if shard_size < 1:
        raise ConfigError(f"shard_size: must be >= 1, got {shard_size}")
    cols = dataset.column_names
    fingerprints, origins, tokens = [], [], []
    for i, row in enumerate(dataset):
        fingerprints.append(example_fingerprint(row["input_ids"], row["labels"]))
        origins.append(f"{row['source']}:{row['line']}" if "source" in cols else f"#{i}")
        tokens.append(int((np.asarray(row["labels"][1:]) != -100).sum()))
    return {
        "format": FORMAT,
        "version": VERSION,
        "reference": reference,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "max_length": max_length,
        "truncation": TRUNCATION,
        "data": list(data),
        "top_k": int(min(top_k, vocab_size)),
        "dtype": dtype,
        "ids_dtype": ids_dtype(vocab_size),
        "vocab_size": int(vocab_size),
        "backend": backend,
        "shard_size": int(shard_size),
        "num_examples": len(fingerprints),
        "num_tokens": int(sum(tokens)),
        "examples": {"fingerprint": fingerprints, "origin": origins, "tokens": tokens},
    }


def _shards(plan: dict) -> list[tuple[int, int]]:
    n, size = plan["num_examples"], plan["shard_size"]
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _first_difference(a: dict, b: dict) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key == "examples":
                fa, fb = a[key]["fingerprint"], b[key]["fingerprint"]
                i = next((i for i, (x, y) in enumerate(zip(fa, fb)) if x != y), min(len(fa), len(fb)))
                return f"example {i} ({(b[key]['origin'] + ['none'])[min(i, len(fb))]})"
            return f"{key} (was {a.get(key)!r}, now {b.get(key)!r})"
    return None


def prepare_output(output_dir: str | Path, plan: dict, *, overwrite: bool = False, is_main: bool = True) -> Path:
    """Start or resume a build: write build.json, or check that the one there is this plan."""
    out = Path(output_dir)
    existing = out / "build.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        diff = _first_difference(old, plan)
        if diff and not overwrite:
            raise ConfigError(
                f"output_dir: {out} holds a cache built from other data or settings ({diff} differs); "
                "pass --overwrite to rebuild it, or use another --output_dir"
            )
        if not diff:
            return out
    if is_main:
        if overwrite and out.exists():
            for p in out.iterdir():
                if p.name.startswith(("shard-", ".shard-")) or p.name in ("manifest.json", "build.json"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif out.exists() and any(out.iterdir()):
            raise ConfigError(f"output_dir: {out} is not empty and holds no reference cache; use another folder")
        out.mkdir(parents=True, exist_ok=True)
        write_json(existing, plan, indent=1, sort_keys=True)
    return out


def _write_shard(out: Path, index: int, parts: list[CachedRows], counts: list[int], plan: dict) -> None:
    tmp = out / f".{shard_name(index)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    k = plan["top_k"]
    rows = CachedRows(
        *(
            torch.cat([getattr(p, f) for p in parts]) if parts else torch.empty(0)
            for f in ("ids", "logp", "tail", "label")
        )
    )
    n = sum(counts)
    np.save(tmp / "ids.npy", rows.ids.reshape(n, k).numpy().astype(plan["ids_dtype"]))
    np.save(tmp / "logp.npy", _to_store(rows.logp.reshape(n, k).float(), plan["dtype"]))
    np.save(tmp / "tail.npy", rows.tail.reshape(n).float().numpy())
    np.save(tmp / "label.npy", rows.label.reshape(n).float().numpy())
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64))
    for f in tmp.iterdir():  # durable before it looks complete
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, out / shard_name(index))


def _batches(dataset, start: int, end: int, batch_size: int):
    for s in range(start, end, batch_size):
        yield dataset[s : min(s + batch_size, end)]


def build_cache(
    scorer,
    dataset,
    plan: dict,
    output_dir: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    on_shard=None,
) -> dict:
    """Compute this process's missing shards (s % world_size == rank) and write them; returns the build's stats.

    `on_shard(index)` runs after each shard is written (tests interrupt a build there). The manifest is written by
    `finish_cache` once every shard exists.
    """
    out = Path(output_dir)
    for stale in out.glob(f".shard-*.tmp-{os.getpid()}"):
        shutil.rmtree(stale, ignore_errors=True)
    mine = [(i, span) for i, span in enumerate(_shards(plan)) if i % world_size == rank]
    todo = [(i, span) for i, span in mine if not (out / shard_name(i)).is_dir()]
    tokens = plan["examples"]["tokens"]
    total = sum(sum(tokens[s:e]) for _, (s, e) in todo)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, unit="tok", unit_scale=True, disable=not progress, desc="reference cache", dynamic_ncols=True
    )
    done, start = 0, time.perf_counter()
    for index, (s, e) in todo:
        parts, counts = [], []
        for batch in _batches(dataset, s, e, batch_size):
            p, c = scorer(batch, plan["top_k"])
            parts += p
            counts += c
            bar.update(sum(c))
            done += sum(c)
        if counts != tokens[s:e]:
            raise RuntimeError(f"shard {index}: scored {counts} response tokens per example, expected {tokens[s:e]}")
        _write_shard(out, index, parts, counts, plan)
        if on_shard is not None:
            on_shard(index)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "shards": len(todo),
        "reused": len(mine) - len(todo),  # shards an interrupted build (or a complete cache) already held
        "tokens": done,
        "seconds": seconds,
        "tokens_per_s": done / seconds if seconds else 0,
    }


def finish_cache(output_dir: str | Path, plan: dict) -> dict:
    """Write manifest.json (the last file: a cache is complete once it exists) when every shard is there."""
    out = Path(output_dir)
    shards = []
    for i, (s, e) in enumerate(_shards(plan)):
        folder = out / shard_name(i)
        if not folder.is_dir():
            raise RuntimeError(f"{folder} is missing: the build is not finished (run the same command again)")
        shards.append(
            {
                "name": folder.name,
                "first": s,
                "count": e - s,
                "tokens": sum(plan["examples"]["tokens"][s:e]),
                "bytes": sum(f.stat().st_size for f in sorted(folder.iterdir())),
            }
        )
    for stale in out.glob(".shard-*.tmp-*"):  # left by an interrupted build; every process is done by now
        shutil.rmtree(stale, ignore_errors=True)
    manifest = {**plan, "shards": shards}
    write_json(out / "manifest.json", manifest, indent=1, sort_keys=True)
    return manifest


def _open_array(file: Path) -> np.ndarray:
    """One shard array, memory-mapped; a missing or damaged file is one line naming it and what to do."""
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        problem = "is missing"
    except (ValueError, OSError) as e:  # a cut file: "mmap length is greater than file size", a bad header
        problem = f"is damaged ({e})"
    raise ConfigError(
        f"reference_cache: {file} {problem}; rebuild the cache: asft cache-reference ... --overwrite"
    ) from None


class ReferenceCache:
    """A finished cache, read memory-mapped: `rows(examples)` gives the CachedRows of those examples, concatenated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            what = (
                "an unfinished build (run asft cache-reference again to finish it)"
                if (self.path / "build.json").exists()
                else "no reference cache"
            )
            raise ConfigError(f"reference_cache: {self.path} holds {what}")
        rebuild = "rebuild it: asft cache-reference ... --overwrite"
        try:
            self.manifest = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"reference_cache: {manifest} is damaged (not valid JSON: {e}); {rebuild}") from None
        if not isinstance(self.manifest, dict) or (
            self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION
        ):
            raise ConfigError(f"reference_cache: {self.path} is not an {FORMAT} v{VERSION}")
        try:
            self.fingerprints = self.manifest["examples"]["fingerprint"]
            self.origins = self.manifest["examples"]["origin"]
            self.tokens = self.manifest["examples"]["tokens"]
            self._first = np.array([s["first"] for s in self.manifest["shards"]])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"reference_cache: {manifest} is damaged (no {e}); {rebuild}") from None
        self._open: dict[int, dict[str, np.ndarray]] = {}
        for i in range(len(self.manifest["shards"])):  # a missing or cut shard fails here, not at step 0
            self._shard(i)

    def __len__(self) -> int:
        return len(self.fingerprints)

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._open:
            folder = self.path / self.manifest["shards"][i]["name"]
            self._open[i] = {
                name: _open_array(folder / f"{name}.npy") for name in ("ids", "logp", "tail", "label", "offsets")
            }
        return self._open[i]

    def rows(self, examples) -> CachedRows:
        parts = []
        for e in (int(x) for x in examples):
            if not 0 <= e < len(self):
                raise IndexError(f"example {e} is not in the cache ({len(self)} examples)")
            i = int(np.searchsorted(self._first, e, side="right") - 1)
            shard = self._shard(i)
            j = e - int(self._first[i])
            a, b = int(shard["offsets"][j]), int(shard["offsets"][j + 1])
            parts.append((shard["ids"][a:b], shard["logp"][a:b], shard["tail"][a:b], shard["label"][a:b]))
        if not parts:
            k = self.top_k
            return CachedRows(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0), torch.zeros(0))
        ids, logp, tail, label = (np.concatenate([p[f] for p in parts]) for f in range(4))
        return CachedRows(
            torch.from_numpy(ids.astype(np.int64)),
            _from_store(logp, self.manifest["dtype"]),
            torch.from_numpy(np.ascontiguousarray(tail)),
            torch.from_numpy(np.ascontiguousarray(label)),
        )

    def label_logprobs(self) -> tuple[np.ndarray, np.ndarray]:
        """log rho(y_t) of every cached response token, in order (float64), and the index of its example (int64);
        reads only the label and offsets arrays."""
        logp, examples = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
        for i, shard in enumerate(self.manifest["shards"]):
            arrays = self._shard(i)
            logp.append(np.asarray(arrays["label"], dtype=np.float64))
            counts = np.diff(np.asarray(arrays["offsets"], dtype=np.int64))
            examples.append(shard["first"] + np.repeat(np.arange(len(counts), dtype=np.int64), counts))
        return np.concatenate(logp), np.concatenate(examples)

    # ------------------------------------------------------------------------------------------------ checks

    def _describe(self) -> str:
        m = self.manifest
        return (
            f"the cache was built from {','.join(m['data'])} with template={m['template']}, "
            f"max_length={m['max_length']}, truncation={m['truncation']}"
        )

    def check_settings(
        self, *, tokenizer=None, template: str | None = None, max_length=_UNSET, truncation: str | None = None
    ) -> None:
        """Refuse a cache built with another tokenizer, template, max length or truncation, naming the field."""
        m, where = self.manifest, f"reference_cache {self.path}"
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m["tokenizer"]:
            raise CacheMismatchError(
                f"{where}: field 'tokenizer': the cache was built with another tokenizer "
                f"(fingerprint {m['tokenizer']}); rebuild it with this model's tokenizer"
            )
        if template is not None and template != m["template"]:
            raise CacheMismatchError(
                f"{where}: field 'template': the cache was built with {m['template']!r}, training uses {template!r}"
            )
        if max_length is not _UNSET and max_length != m["max_length"]:
            raise CacheMismatchError(
                f"{where}: field 'max_length': the cache was built with {m['max_length']}, training uses {max_length}"
            )
        if truncation is not None and truncation != m["truncation"]:
            raise CacheMismatchError(
                f"{where}: field 'truncation': the cache was built with {m['truncation']!r}, "
                f"training uses {truncation!r}"
            )

    def check_example(self, index: int, input_ids, labels, origin: str | None = None) -> None:
        """Refuse an example whose token ids are not those the cache was built from, naming it."""
        name = f"example {index}" + (f" ({origin})" if origin else "")
        if not 0 <= index < len(self):
            raise CacheMismatchError(
                f"reference_cache {self.path}: {name}: the cache holds only {len(self)} examples; {self._describe()}"
            )
        if example_fingerprint(input_ids, labels) != self.fingerprints[index]:
            raise CacheMismatchError(
                f"reference_cache {self.path}: {name}: field 'input_ids': its token ids differ from the cache's "
                f"example {index} ({self.origins[index]}); {self._describe()}; rebuild the cache for this data"
            )

    def check_dataset(self, dataset) -> None:
        """Every example of a tokenized dataset (before the trainer's preparation) against the cache, in order."""
        cols = dataset.column_names
        for i, row in enumerate(dataset):
            origin = f"{row['source']}:{row['line']}" if "source" in cols else None
            self.check_example(i, row["input_ids"], row["labels"], origin)
        if len(dataset) != len(self):
            raise CacheMismatchError(
                f"reference_cache {self.path}: the data holds {len(dataset)} examples, the cache "
                f"{len(self)} (example {len(dataset)}: {self.origins[len(dataset)]} has no "
                f"counterpart); {self._describe()}"
            )

    def stats(self) -> dict:
        """Size, bytes per token and the mean tail mass (how much of the reference's probability top-k leaves out)."""
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        tail_sum, n, data = 0.0, 0, 0
        for i in range(len(self.manifest["shards"])):
            shard = self._shard(i)
            data += sum(shard[name].nbytes for name in ("ids", "logp", "tail", "label"))  # per token, no headers
            t = np.asarray(shard["tail"], dtype=np.float64)
            tail_sum += float(np.exp(t).sum())
            n += t.size
        return {"bytes": size, "bytes_per_token": data / max(n, 1), "mean_tail_mass": tail_sum / max(n, 1), "tokens": n}
