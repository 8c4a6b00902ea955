"""Weighted, deterministic sampling over sources, with state.

Each draw picks a source with probability proportional to its weight among the active ones (one
`random.Random` seeded from the data seed). An exhausted source starts its next epoch (its files and
windows reshuffled by the epoch number) while it has epochs left, `on_exhausted: restart`, or leaves
the mixture, `drop`. The mixer is done when every source has left.
"""

from __future__ import annotations

import random
from typing import Any

from .sources import Source


class Mixer:
    def __init__(self, sources: list[Source], weights: list[float], *, seed: int, on_exhausted: str = "restart", max_epochs: int | None = None):
        if len(sources) != len(weights) or any(w <= 0 for w in weights):
            raise ValueError("data.sources: every source needs a positive weight")
        self.sources, self.weights = sources, list(weights)
        self.on_exhausted, self.max_epochs = on_exhausted, max_epochs
        self.rng = random.Random(seed)
        self.active = [True] * len(sources)
        self.counts = [0] * len(sources)

    def next(self) -> tuple[int, str, Any] | None:
        """(source index, where, raw record) or None when every source is exhausted."""
        while any(self.active):
            idx = self._pick()
            src = self.sources[idx]
            item = src.next()
            if item is None:
                epoch = src.cursor.epoch + 1
                if self.on_exhausted == "restart" and (self.max_epochs is None or epoch < self.max_epochs):
                    src.start_epoch(epoch)
                    item = src.next()
                if item is None:  # dropped, out of epochs, or empty for this rank
                    self.active[idx] = False
                    continue
            self.counts[idx] += 1
            return idx, item[0], item[1]
        return None

    def _pick(self) -> int:
        ids = [i for i, a in enumerate(self.active) if a]
        return self.rng.choices(ids, weights=[self.weights[i] for i in ids])[0]

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.getstate(),
            "active": list(self.active),
            "counts": list(self.counts),
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"data state has {len(state['sources'])} sources, the config has {len(self.sources)}")
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.active, self.counts = list(state["active"]), list(state["counts"])
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)
