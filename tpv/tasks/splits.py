"""The split protocol (the paper's, adapted to sources that ship no held-out set); see ``tpv.tasks``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from tpv.tasks.spec import Split, SplitProtocol

Row = dict[str, Any]


def carve(rows: Sequence[Row], n: int, seed: int, group_field: str | None = None) -> tuple[list[Row], list[Row]]:
    """Split ``rows`` into (rest, carved) with about ``n`` carved, taking whole groups in a seeded order.

    Both parts keep the input order. Groups are taken until at least ``n`` rows are carved, so with groups the
    carved part can overshoot by less than one group.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[group_field] if group_field else i, []).append(i)
    members = list(groups.values())
    taken: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(taken) >= n:
            break
        taken.update(members[g])
    rest = [row for i, row in enumerate(rows) if i not in taken]
    carved = [row for i, row in enumerate(rows) if i in taken]
    return rest, carved


def make_splits(pool: Sequence[Row], heldout: Sequence[Row] | None, protocol: SplitProtocol) -> dict[Split, list[Row]]:
    """Train/validation/test from a train pool and the source's own held-out set (``None`` when it has none)."""
    large = len(pool) >= protocol.large_threshold
    seed, group = protocol.seed, protocol.group_field
    if heldout is None:
        share = protocol.test_fraction if large else 2 * protocol.test_fraction
        pool, heldout = carve(pool, round(share * len(pool)), seed, group)
    if large:
        train, validation = carve(pool, protocol.validation_size, seed + 1, group)
        return {"train": train, "validation": validation, "test": list(heldout)}
    test, validation = carve(heldout, len(heldout) // 2, seed + 2, group)
    return {"train": list(pool), "validation": validation, "test": test}
