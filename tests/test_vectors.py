"""TaskPromptVector, VectorMeta and the similarity measures, on real tensors."""

import hashlib
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tpv.vectors import (
    TaskPromptVector,
    VectorError,
    VectorMeta,
    SIMILARITY_MODES,
    cosine_similarity,
    mean_row_share,
    make_vector_id,
    similarity_by_pair_kind,
    same_task_permutation_test,
    similarity_matrix,
    tensor_sha256,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vec(seed: int = 0, task: str = "sst2", backbone: str = "t5-base", shape=(5, 8)) -> TaskPromptVector:
    return TaskPromptVector.create(_randn(*shape, seed=seed), task=task, backbone_id=backbone, origin_seed=seed)


def test_from_prompts_is_tuned_minus_origin_with_filled_meta():
    origin, tuned = _randn(5, 8, seed=1), _randn(5, 8, seed=2)
    v = TaskPromptVector.from_prompts(
        tuned, origin, task="mnli", backbone_id="t5-base", origin_seed=3, metrics={"acc": 0.8}, train_config={"lr": 0.3}
    )
    assert torch.equal(v.tensor, tuned - origin)
    assert v.meta.prompt_length == 5 and v.meta.hidden_size == 8 and v.shape == (5, 8)
    assert v.meta.sha256 == tensor_sha256(tuned - origin)
    assert v.vector_id == make_vector_id("mnli", 3, v.meta.sha256) == f"mnli-s3-{v.meta.sha256[:12]}"
    assert v.meta.kind == "task" and v.meta.parents == [] and v.meta.metrics == {"acc": 0.8}
    assert v.tensor.dtype == torch.float32


def test_sha256_is_of_float32_little_endian_bytes():
    t = _randn(3, 4)
    assert tensor_sha256(t) == hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()
    assert tensor_sha256(t.double()) == tensor_sha256(t)  # hashed as float32
    assert tensor_sha256(t.T.contiguous().T) == tensor_sha256(t)  # layout does not matter


def test_apply_recovers_the_tuned_prompt_and_works_on_another_origin():
    origin, tuned = _randn(5, 8, seed=1), _randn(5, 8, seed=2)
    v = TaskPromptVector.from_prompts(tuned, origin, task="t", backbone_id="b", origin_seed=1)
    assert torch.allclose(v.apply(origin), tuned, atol=1e-6)
    other = _randn(5, 8, seed=9)  # cross-origin: O' + tau
    assert torch.allclose(v.apply(other), other + (tuned - origin), atol=1e-6)
    assert torch.allclose(v.apply(other) - other, v.tensor, atol=1e-6)
    half = v.apply(other.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    with pytest.raises(VectorError, match="shape"):
        v.apply(_randn(4, 8))


def test_vector_is_isolated_from_later_edits_of_the_input():
    t = _randn(5, 8)
    v = TaskPromptVector.create(t, task="t", backbone_id="b", origin_seed=0)
    t.add_(1.0)
    assert v.meta.sha256 == tensor_sha256(v.tensor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(bad):
    t = _randn(5, 8)
    t[2, 3] = bad
    with pytest.raises(VectorError, match="non-finite"):
        TaskPromptVector.create(t, task="t", backbone_id="b", origin_seed=0)
    with pytest.raises(VectorError, match="non-finite"):
        TaskPromptVector.from_prompts(t, _randn(5, 8), task="t", backbone_id="b", origin_seed=0)


def test_constructor_checks_shape_sha_and_type():
    v = _vec()
    with pytest.raises(VectorError, match="does not match"):
        TaskPromptVector(_randn(4, 8), v.meta)
    with pytest.raises(VectorError, match="sha256"):
        TaskPromptVector(v.tensor + 1, v.meta)
    with pytest.raises(VectorError, match="floating"):
        TaskPromptVector(torch.zeros(5, 8, dtype=torch.int64), v.meta)
    with pytest.raises(VectorError, match="torch.Tensor"):
        TaskPromptVector(np.zeros((5, 8), np.float32), v.meta)  # type: ignore[arg-type]
    with pytest.raises(VectorError, match="2-D"):
        TaskPromptVector.create(_randn(2, 5, 8), task="t", backbone_id="b", origin_seed=0)
    with pytest.raises(VectorError, match="origin shape"):
        TaskPromptVector.from_prompts(_randn(5, 8), _randn(5, 7), task="t", backbone_id="b", origin_seed=0)
    assert TaskPromptVector(v.tensor.double(), v.meta).tensor.dtype == torch.float32


def test_meta_validation():
    good = _vec().meta.model_dump()
    VectorMeta.model_validate(good)
    for field, value in [
        ("sha256", "abc"), ("sha256", "G" * 64), ("created_at", "yesterday"), ("prompt_length", 0),
        ("hidden_size", -1), ("kind", "other"), ("task", ""),
    ]:
        with pytest.raises(ValidationError):
            VectorMeta.model_validate({**good, field: value})
    with pytest.raises(ValidationError):
        VectorMeta.model_validate({**good, "unexpected": 1})
    meta = VectorMeta.model_validate({**good, "kind": "composition", "parents": ["a", "b"], "notes": "n"})
    assert VectorMeta.model_validate_json(meta.model_dump_json()) == meta


def test_check_compatible_names_both_sides():
    a, b = _vec(0, backbone="t5-base"), _vec(1, backbone="t5-large")
    with pytest.raises(VectorError) as err:
        a.check_compatible([b])
    msg = str(err.value)
    assert a.vector_id in msg and b.vector_id in msg and "t5-base" in msg and "t5-large" in msg
    c = _vec(2, shape=(6, 8))
    with pytest.raises(VectorError, match="shape mismatch") as err:
        a.check_compatible([c])
    assert c.vector_id in str(err.value)
    a.check_compatible([_vec(3), _vec(4)])


def test_cosine_modes_on_hand_computed_inputs():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_similarity(a, b, "per_row_mean") == pytest.approx(1.0)  # each row points the same way
    assert cosine_similarity(a, b, "flat") == pytest.approx(3 / math.sqrt(10))
    assert cosine_similarity(a, b, "row_averaged") == pytest.approx(3 / math.sqrt(10))  # [.5,.5] vs [.5,1]
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert cosine_similarity(a, c, "per_row_mean") == pytest.approx(0.5)  # rows: cos 1 and cos 0
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity(a, -a, "per_row_mean") == pytest.approx(-1.0)
    zero_row = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert cosine_similarity(a, zero_row, "per_row_mean") == pytest.approx(0.5)  # the zero row counts as 0


def test_the_measures_disagree_on_one_pair():
    """Rows that cancel when averaged: flat sees orthogonal vectors, per-row sees identical rows half the time,
    row-averaged sees the mean rows only, row-centered what each row adds to them."""
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert cosine_similarity(a, b, "flat") == pytest.approx(1 / 3)  # (1 - 1 + 1) / (sqrt3 * sqrt3)
    assert cosine_similarity(a, b, "per_row_mean") == pytest.approx(1 / 3)  # (1 - 1 + 1) / 3
    assert cosine_similarity(a, b, "row_averaged") == pytest.approx(1 / math.sqrt(5))  # [0, 1/3] vs [2/3, 1/3]
    # centered rows [[1,-1/3],[-1,-1/3],[0,2/3]] and [[1/3,-1/3],[1/3,-1/3],[-2/3,2/3]]: dot 2/3, norms^2 8/3, 4/3
    assert cosine_similarity(a, b, "row_centered") == pytest.approx(1 / (2 * math.sqrt(2)))
    assert mean_row_share(a) == pytest.approx(1 / 9) and mean_row_share(b) == pytest.approx(5 / 9)
    equal_rows = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert mean_row_share(equal_rows) == pytest.approx(1.0)
    assert cosine_similarity(equal_rows, b[:2], "row_centered") == 0.0  # nothing left once the mean row is gone
    d = torch.tensor([[2.0, 0.0], [0.0, 0.1]])
    e = torch.tensor([[2.0, 0.0], [0.0, -0.1]])
    assert cosine_similarity(d, e, "per_row_mean") == pytest.approx(0.0)  # rows: +1 and -1
    assert cosine_similarity(d, e, "flat") == pytest.approx((4 - 0.01) / 4.01)  # the big row dominates


def test_flat_is_the_default_and_matches_torch():
    a, b = _vec(0), _vec(1)
    flat = torch.nn.functional.cosine_similarity(a.tensor.flatten(), b.tensor.flatten(), dim=0).item()
    assert cosine_similarity(a, b) == pytest.approx(flat, abs=1e-6)
    per_row = torch.nn.functional.cosine_similarity(a.tensor, b.tensor, dim=1).mean().item()
    assert cosine_similarity(a, b.tensor, mode="per_row_mean") == pytest.approx(per_row, abs=1e-6)
    averaged = torch.nn.functional.cosine_similarity(a.tensor.mean(0), b.tensor.mean(0), dim=0).item()
    assert cosine_similarity(a, b, mode="row_averaged") == pytest.approx(averaged, abs=1e-6)


def test_flat_splits_into_the_mean_row_and_the_rest():
    a, b = _vec(0), _vec(1)
    a = a.tensor + torch.linspace(0.0, 2.0, a.tensor.shape[1])  # a shared part in every row, so both terms count
    sa, sb = mean_row_share(a), mean_row_share(b)
    assert 0.2 < sa < 0.99 and 0.0 < sb < 0.2
    split = (math.sqrt(sa * sb) * cosine_similarity(a, b, "row_averaged")
             + math.sqrt((1 - sa) * (1 - sb)) * cosine_similarity(a, b, "row_centered"))
    assert cosine_similarity(a, b) == pytest.approx(split, abs=1e-9)


def test_pair_kinds_group_a_similarity_matrix():
    metas = [_vec(i, task=t).meta.model_copy(update={"origin_seed": s})
             for i, (t, s) in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)])]
    matrix = np.arange(16, dtype=float).reshape(4, 4)
    groups = similarity_by_pair_kind(metas, matrix)
    assert groups == {"same_task": [matrix[0, 1], matrix[2, 3]], "diff_task": [matrix[0, 3], matrix[1, 2]],
                      "same_origin": [matrix[0, 2], matrix[1, 3]]}


def _grid_metas(tasks: str, origins: int):
    cells = [(t, s) for s in range(origins) for t in tasks]
    return [_vec(i, task=t).meta.model_copy(update={"origin_seed": s}) for i, (t, s) in enumerate(cells)]


def _same_task_matrix(metas, same: float, other: float = 0.0) -> np.ndarray:
    return np.array([[same if a.task == b.task else other for b in metas] for a in metas])


def test_the_permutation_test_counts_every_arrangement_of_task_labels_within_origins():
    metas = _grid_metas("abc", 2)  # 3 tasks x 2 origins: 3! arrangements of origin 1's labels
    test = same_task_permutation_test(metas, _same_task_matrix(metas, 0.9))
    # only the true labels pair every task with itself; any other arrangement keeps at most one task matched
    assert (test.p, test.arrangements, test.exact, test.smallest_p) == (1 / 6, 6, True, 1 / 6)
    assert same_task_permutation_test(metas, np.full((6, 6), 0.5)).p == 1.0  # every arrangement ties
    # same-origin pairs never count: a huge same-origin similarity leaves the test as it was
    origin_heavy = _same_task_matrix(metas, 0.9) + 5.0 * np.array([[a.origin_seed == b.origin_seed and a.task != b.task
                                                                     for b in metas] for a in metas])
    assert same_task_permutation_test(metas, origin_heavy).p == 1 / 6
    # the other way round: same-task pairs BELOW the rest are as unremarkable as can be
    assert same_task_permutation_test(metas, _same_task_matrix(metas, -0.9)).p == 1.0


def _every_arrangement_p(metas, matrix) -> float:
    """The oracle: every within-origin arrangement of the task labels, none skipped."""
    import itertools

    tasks, origins = [m.task for m in metas], [m.origin_seed for m in metas]
    groups = [[i for i, o in enumerate(origins) if o == origin] for origin in dict.fromkeys(origins)]

    def mean(labels):
        same = [matrix[i, j] for i in range(len(labels)) for j in range(i + 1, len(labels))
                if origins[i] != origins[j] and labels[i] == labels[j]]
        return sum(same) / len(same) if same else -math.inf

    observed, hits, total = mean(tasks), 0, 0
    for orders in itertools.product(*(itertools.permutations([tasks[i] for i in g]) for g in groups)):
        labels = list(tasks)
        for g, order in zip(groups, orders):
            for i, t in zip(g, order):
                labels[i] = t
        hits, total = hits + (mean(labels) >= observed - 1e-12), total + 1
    return hits / total


def test_the_permutation_test_enumerates_every_origin_when_origins_hold_different_tasks():
    """Origins of tasks {a, b}, {a, c}, {b, c}: fixing the first origin's labels (a shortcut that holds only when
    every origin holds the same tasks) gave p 0.25 here, where every arrangement counted gives 0.5."""
    cells = [("a", 0), ("b", 0), ("a", 1), ("c", 1), ("b", 2), ("c", 2)]
    metas = [_vec(i, task=t).meta.model_copy(update={"origin_seed": s}) for i, (t, s) in enumerate(cells)]
    upper = np.zeros((6, 6))
    for i, j in [(0, 4), (1, 2), (1, 3), (1, 4), (3, 4), (3, 5), (4, 5)]:
        upper[i, j] = 1.0
    matrix = upper + upper.T
    test = same_task_permutation_test(metas, matrix)
    assert (test.p, test.arrangements, test.smallest_p) == (0.5, 8, 1 / 8) == (_every_arrangement_p(metas, matrix),
                                                                                8, 1 / 8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise = rng.normal(size=(6, 6))
        noise = noise + noise.T
        assert same_task_permutation_test(metas, noise).p == pytest.approx(_every_arrangement_p(metas, noise))
    # the same tasks on every origin: the shortcut holds, and agrees with the oracle
    grid = _grid_metas("abc", 2)
    noise = rng.normal(size=(6, 6))
    noise = noise + noise.T
    shortcut = same_task_permutation_test(grid, noise)
    assert shortcut.arrangements == 6 and shortcut.p == pytest.approx(_every_arrangement_p(grid, noise))


def test_the_permutation_test_samples_when_arrangements_are_many_and_needs_a_shared_task():
    metas = _grid_metas("abcd", 3)  # (4!)^2 = 576 arrangements
    exact = same_task_permutation_test(metas, _same_task_matrix(metas, 0.9))
    assert (exact.p, exact.arrangements, exact.exact) == (1 / 576, 576, True)
    sampled = same_task_permutation_test(metas, _same_task_matrix(metas, 0.9), samples=200, seed=3)
    assert (sampled.exact, sampled.arrangements, sampled.smallest_p) == (False, 200, 1 / 201)
    assert sampled.p <= 3 / 201  # a random arrangement matches every task with probability 1/576
    one_origin_each = [_vec(i, task=t).meta.model_copy(update={"origin_seed": i}) for i, t in enumerate("ab")]
    assert same_task_permutation_test(one_origin_each, np.eye(2)) is None


def test_cosine_bad_inputs():
    a = _vec(0)
    with pytest.raises(VectorError, match="mode"):
        cosine_similarity(a, a, mode="rows")  # type: ignore[arg-type]
    with pytest.raises(VectorError, match="different shapes"):
        cosine_similarity(a.tensor, _randn(6, 8))
    with pytest.raises(VectorError, match="2-D"):
        cosine_similarity(a.tensor.flatten(), a.tensor.flatten())
    nan = a.tensor.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(VectorError, match="non-finite"):
        cosine_similarity(nan, a.tensor)
    with pytest.raises(VectorError, match="backbone mismatch"):
        cosine_similarity(a, _vec(1, backbone="other"))


def test_similarity_matrix():
    vs = [_vec(0), _vec(1), _vec(2)]
    for mode in SIMILARITY_MODES:
        labels, sim = similarity_matrix(vs, mode)
        assert labels == [v.vector_id for v in vs]
        assert sim.shape == (3, 3) and sim.dtype == np.float64
        assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
        assert sim[0, 2] == pytest.approx(cosine_similarity(vs[0], vs[2], mode))
    labels, sim = similarity_matrix({"x": vs[0].tensor, "y": -vs[0].tensor})
    assert labels == ["x", "y"] and sim[0, 1] == pytest.approx(-1.0)
    with pytest.raises(VectorError, match="at least one"):
        similarity_matrix([])


def test_one_tensor_from_two_jobs_gets_two_ids():
    """Deterministic runs of one recipe in two jobs produce one tensor; each job's set must keep its own entry."""
    t = _randn(5, 8, seed=3)
    a = TaskPromptVector.create(t, task="mnli", backbone_id="t5-base", origin_seed=0, source="tpv sweep a")
    b = TaskPromptVector.create(t, task="mnli", backbone_id="t5-base", origin_seed=0, source="tpv sweep b")
    plain = TaskPromptVector.create(t, task="mnli", backbone_id="t5-base", origin_seed=0)
    assert len({a.vector_id, b.vector_id, plain.vector_id}) == 3
    assert a.meta.sha256 == b.meta.sha256 == plain.meta.sha256
    assert plain.vector_id == f"mnli-s0-{plain.meta.sha256[:12]}"
    assert a.vector_id == make_vector_id("mnli", 0, a.meta.sha256, "tpv sweep a")
