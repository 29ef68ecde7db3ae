"""The playground's heatmap: pairwise cosine of the served backbone's stored vectors, by `tpv.vectors`.

Cosine needs one shape, so vectors are grouped by (prompt length, hidden size) and each group gets its own matrix
(`tpv.vectors.similarity_matrix`, the paper's `flat` mode: the one implementation). Plain Python (no Ray): the model
replica computes it once per store version, the ingress keeps the rows and columns a caller's key may see.
"""

from __future__ import annotations

import logging

from serve.schemas import SimilarityGroup
from tpv.errors import TpvError
from tpv.store import VectorStore
from tpv.vectors import VectorMeta, similarity_matrix

logger = logging.getLogger("ray.serve")

MAX_VECTORS_PER_GROUP = 128  # the first ones by task and seed; the rest are counted in `left_out`


def similarity_groups(store: VectorStore, backbone_id: str, metas: list[VectorMeta]) -> list[SimilarityGroup]:
    """One flat-cosine matrix per vector shape, rows ordered by (task, origin seed, id). A vector that fails its
    check on load is left out of the matrix (and counted) instead of failing the whole heatmap."""
    shapes: dict[tuple[int, int], list[VectorMeta]] = {}
    for meta in sorted(metas, key=lambda m: (m.task, m.origin_seed, m.vector_id)):
        shapes.setdefault((meta.prompt_length, meta.hidden_size), []).append(meta)
    groups = []
    for (length, hidden), members in sorted(shapes.items()):
        vectors, left_out = [], max(len(members) - MAX_VECTORS_PER_GROUP, 0)
        for meta in members[:MAX_VECTORS_PER_GROUP]:
            try:
                vectors.append(store.get(meta.vector_id, backbone_id))
            except TpvError as exc:  # corrupt or just replaced: the listing still shows it
                logger.warning("tpv: heatmap leaves out %s: %s", meta.vector_id, type(exc).__name__)
                left_out += 1
        if not vectors:
            continue
        ids, matrix = similarity_matrix(vectors, "flat")
        groups.append(SimilarityGroup(prompt_length=length, hidden_size=hidden, vector_ids=ids,
                                      tasks=[v.meta.task for v in vectors], matrix=matrix.round(6).tolist(),
                                      left_out=left_out))
    return groups


def visible(groups: list[SimilarityGroup], allowed) -> list[SimilarityGroup]:
    """The groups restricted to the vectors whose task `allowed(task)` accepts (an API key's scope)."""
    out = []
    for g in groups:
        keep = [i for i, task in enumerate(g.tasks) if allowed(task)]
        if keep:
            out.append(g.model_copy(update={
                "vector_ids": [g.vector_ids[i] for i in keep], "tasks": [g.tasks[i] for i in keep],
                "matrix": [[g.matrix[i][j] for j in keep] for i in keep],
            }))
    return out
