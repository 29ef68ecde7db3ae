"""The split protocol (the paper's, adapted to sources that ship no held-out set); see ``tpv.tasks``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from tpv.tasks.spec import SPLITS, Split, SplitProtocol

Row = dict[str, Any]


def _take(rows: Sequence[Row], indices: Sequence[int], n: int, seed: int, group_field: str | None) -> set[int]:
    """At least ``n`` of ``indices`` (fewer only when there are fewer), whole groups in a seeded order."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(rows[i][group_field] if group_field else i, []).append(i)
    members = list(groups.values())
    taken: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(taken) >= n:
            break
        taken.update(members[g])
    return taken


def _quotas(sizes: Sequence[int], n: int) -> list[int]:
    """``n`` shared out in proportion to ``sizes`` by largest remainder, so the quotas sum to exactly ``n``."""
    total = sum(sizes)
    exact = [n * size / total for size in sizes]
    quotas = [int(q) for q in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda k: (quotas[k] - exact[k], k))
    for k in by_remainder[: n - sum(quotas)]:
        quotas[k] += 1
    return quotas


def carve(rows: Sequence[Row], n: int, seed: int, group_field: str | None = None,
          stratify_field: str | None = None) -> tuple[list[Row], list[Row]]:
    """Split ``rows`` into (rest, carved) with about ``n`` carved, taking whole groups in a seeded order.

    Both parts keep the input order. Groups are taken until at least ``n`` rows are carved, so with groups the
    carved part can overshoot by less than one group. With ``stratify_field`` each value of that field (the class)
    gives its proportional share of ``n``, so both parts keep the class balance of ``rows``.
    """
    if stratify_field is None:
        taken = _take(rows, range(len(rows)), n, seed, group_field)
    else:
        classes: dict[Hashable, list[int]] = {}
        for i, row in enumerate(rows):
            classes.setdefault(row[stratify_field], []).append(i)
        members = [classes[c] for c in sorted(classes, key=str)]
        taken = set()
        for k, (indices, quota) in enumerate(zip(members, _quotas([len(m) for m in members], n))):
            taken |= _take(rows, indices, quota, seed + 1000 * k, group_field)
    rest = [row for i, row in enumerate(rows) if i not in taken]
    carved = [row for i, row in enumerate(rows) if i in taken]
    return rest, carved


def make_splits(pool: Sequence[Row], heldout: Sequence[Row] | None, protocol: SplitProtocol) -> dict[Split, list[Row]]:
    """Train/validation/test from a train pool and the source's own held-out set (``None`` when it has none)."""
    large = len(pool) >= protocol.large_threshold
    seed, group = protocol.seed, protocol.group_field
    strata = "label" if protocol.stratify else None
    if heldout is None:
        share = protocol.test_fraction if large else 2 * protocol.test_fraction
        pool, heldout = carve(pool, round(share * len(pool)), seed, group, strata)
    if large:
        train, validation = carve(pool, protocol.validation_size, seed + 1, group, strata)
        return {"train": train, "validation": validation, "test": list(heldout)}
    test, validation = carve(heldout, len(heldout) // 2, seed + 2, group, strata)
    return {"train": list(pool), "validation": validation, "test": test}


def split_of_groups(pool: Sequence[Row], protocol: SplitProtocol) -> dict[Hashable, Split]:
    """The split each group key (``protocol.group_field``) of ``pool`` lands in: tasks built from one source file
    take their rows' splits from here, so one text is in one split in every such task."""
    if protocol.group_field is None:
        raise ValueError("a shared split needs the protocol's group_field (the key rows share across tasks)")
    return {row[protocol.group_field]: split for split, rows in make_splits(pool, None, protocol).items()
            for row in rows}


def splits_from_groups(rows: Sequence[Row], assignment: dict[Hashable, Split], group_field: str
                       ) -> dict[Split, list[Row]]:
    """``rows`` into the splits ``assignment`` gives their group keys, keeping their order."""
    return {split: [row for row in rows if assignment[row[group_field]] == split] for split in SPLITS}
