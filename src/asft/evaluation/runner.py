"""What every task shares during a run: flags, tokenizer, template, the resume store, and a lazily loaded model.

The model is loaded on first use only: a rerun whose generations are all stored never loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .backends import make_backend
from .datafiles import Dataset, Item
from .store import Store


class Run:
    def __init__(self, args, tokenizer, template: str, store: Store, backend=None):
        """`backend`: one already made (evaluation during training: the weights in memory); else loaded on use."""
        self.args, self.tokenizer, self.template, self.store = args, tokenizer, template, store
        self._backend = backend
        self.state: dict = {}  # what a task keeps between datasets (a loaded reference model, collected outputs)

    @property
    def backend(self):
        if self._backend is None:
            print(f"Loading {self.args.model} with the {self.args.backend} backend ...", file=sys.stderr, flush=True)
            self._backend = make_backend(self.args, self.tokenizer)
        return self._backend

    def complete(
        self,
        ds: Dataset,
        items: list[Item],
        compute: Callable[[list[Item]], list[list]],
        *,
        samples: int = 1,
        length: Callable[[Item], int] | None = None,
    ) -> dict[int, list]:
        """Outputs of every item (a list of `samples` per item): stored ones reused, the rest computed in batches
        by `compute` and stored batch by batch. `length` sorts the work longest first (less padding; an
        out-of-memory batch shows up at once)."""
        from tqdm.auto import tqdm

        pending = [it for it in items if self.store.get(ds.name, it.index, samples) is None]
        if len(pending) < len(items):
            print(
                f"{ds.name}: reused {len(items) - len(pending)} finished items from {self.store.dir}",
                file=sys.stderr,
                flush=True,
            )
        if length is not None:
            pending.sort(key=length, reverse=True)
        size = self.args.batch_size
        with tqdm(
            total=len(items),
            initial=len(items) - len(pending),
            desc=f"{self.args.task} {ds.name}",
            unit="item",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=self.args.quiet,
        ) as bar:
            for start in range(0, len(pending), size):
                batch = pending[start : start + size]
                outputs = compute(batch)
                self.store.put_many([(ds.name, it.index, out) for it, out in zip(batch, outputs)])
                bar.update(len(batch))
        return {it.index: self.store.get(ds.name, it.index, samples) for it in items}
