"""The RNG streams a checkpoint holds (state.PARTS["rng"]): every global generator the training step
draws from, on every rank, and the data order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from frcnn_train import distributed


def rng_state() -> dict[str, Any]:
    """Every global RNG the training step can draw from, as weights_only-loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:  # migrated pre-v1 checkpoints carry none
        return
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RngStreams:
    """Every rank's RNG streams plus the data order (a function of the counters, kept for inspect).

    Each rank draws from its own streams (RPN sampling depends on its images). On a resume
    with the world size unchanged each rank gets its own back; with another world size each
    rank gets a fresh stream from `reseed()` (the seed, its rank and the step), the same on
    every such resume.
    """

    def __init__(self, data_order: Callable[[], dict[str, int]], reseed: Callable[[], int]) -> None:
        self.data_order, self.reseed = data_order, reseed

    def state_dict(self) -> dict[str, Any]:
        return {**rng_state(), "ranks": distributed.gather_lists([rng_state()]), "data": dict(self.data_order())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks", [])
        same_world = len(ranks) == distributed.world_size()
        set_rng_state(ranks[distributed.rank()] if same_world else state)
        if ranks and not same_world:
            seed_all(self.reseed())
