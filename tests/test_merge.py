"""The merge registry: arithmetic identities, TIES and DARE on hand-computed inputs, and every bad input."""

import pytest
import torch

from tpv.merge import MERGE_METHODS, MergeError, check_inputs, get_method, merge, parse_params
from tpv.vectors import TaskPromptVector


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


A, B, C = _randn(4, 6, seed=1), _randn(4, 6, seed=2), _randn(4, 6, seed=3)

# hand-worked TIES example, one row of four entries per vector
T1 = torch.tensor([[4.0, -1.0, 0.5, -3.0]])
T2 = torch.tensor([[-2.0, 2.0, 1.0, -0.1]])
T3 = torch.tensor([[1.0, -5.0, -0.2, 0.3]])


def test_registry_holds_exactly_the_methods():
    assert set(MERGE_METHODS) == {"sum", "weighted", "negate", "mean", "ties", "dare"}
    assert not get_method("dare").commutative and get_method("ties").commutative
    assert all(m.doc for m in MERGE_METHODS.values())


def test_sum_and_negate_identities():
    assert torch.equal(merge("sum", [A]), A)
    assert torch.allclose(merge("sum", [A, B]), A + B)
    assert torch.allclose(merge("sum", [A, B, C]), merge("sum", [C, A, B]), atol=1e-6)
    assert torch.equal(merge("negate", [A]), -A)
    assert torch.equal(merge("negate", [merge("negate", [A])]), A)
    assert torch.allclose(merge("sum", [A, merge("negate", [A])]), torch.zeros_like(A))
    assert torch.allclose(merge("sum", [A, B], coefficient=0.5), (A + B) / 2)


def test_weighted_is_coefficient_times_weighted_sum():
    out = merge("weighted", [A, B, C], [0.5, -1.0, 2.0], coefficient=0.3)
    assert torch.allclose(out, 0.3 * (0.5 * A - B + 2 * C), atol=1e-6)
    assert torch.allclose(merge("weighted", [A, B]), merge("sum", [A, B]))
    assert torch.equal(merge("weighted", [A, B], [1.0, 1.0], coefficient=0.0), torch.zeros_like(A))
    assert torch.allclose(merge("weighted", [A, B], torch.tensor([2.0, 3.0])), 2 * A + 3 * B)


def test_mean_over_seeds():
    assert torch.allclose(merge("mean", [A, B, C]), (A + B + C) / 3, atol=1e-6)
    assert torch.equal(merge("mean", [A]), A)


def test_inputs_are_not_modified_and_vectors_are_accepted():
    a0 = A.clone()
    va = TaskPromptVector.create(A, task="t", backbone_id="b", origin_seed=0)
    out = merge("ties", [va, B], [2.0, 1.0], density=0.5)
    out.add_(1)
    assert torch.equal(A, a0) and torch.equal(va.tensor, a0)
    assert merge("sum", [A.double()]).dtype == torch.float32


def test_ties_hand_computed():
    # density 0.5 keeps 2 of 4: [4,0,0,-3], [-2,2,0,0], [1,-5,0,0]; mass [3,-3,0,-3] elects [+,-,0,-]
    out = merge("ties", [T1, T2, T3], density=0.5)
    assert torch.allclose(out, torch.tensor([[2.5, -5.0, 0.0, -3.0]]))
    # weights applied before the election: u2 = [-6,6,0,0], mass [-1,1,0,-3]; weighted mean over agreeing inputs
    out = merge("ties", [T1, T2, T3], [1.0, 3.0, 1.0], density=0.5)
    assert torch.allclose(out, torch.tensor([[-6.0 / 3, 6.0 / 3, 0.0, -3.0]]))
    # density 1: no trimming; signs by mass [3,-4,1.3,-2.8]; mean of the agreeing entries
    out = merge("ties", [T1, T2, T3], density=1.0, coefficient=2.0)
    assert torch.allclose(out, 2 * torch.tensor([[2.5, -3.0, 0.75, -1.55]]))
    assert torch.allclose(merge("ties", [A], density=1.0), A)
    # order does not matter
    assert torch.allclose(merge("ties", [T3, T1, T2], density=0.5), merge("ties", [T1, T2, T3], density=0.5))


def test_weighted_ties_is_mergekits():
    """x = [+1, -1], w = [1, 3]: mergekit gives -1 (sign elected by weighted mass, mean weighted by w)."""
    x = [torch.tensor([[1.0]]), torch.tensor([[-1.0]])]
    assert torch.equal(merge("ties", x, [1.0, 3.0], density=1.0), torch.tensor([[-1.0]]))
    assert torch.equal(merge("ties", x, [3.0, 1.0], density=1.0), torch.tensor([[1.0]]))
    # a zero weighted sum elects +, as mergekit's `sign_weight >= 0`
    assert torch.equal(merge("ties", x, density=1.0), torch.tensor([[1.0]]))
    # two agreeing inputs: their weighted mean (2*1 + 1*4) / 3, not a count-based mean
    y = [torch.tensor([[1.0]]), torch.tensor([[4.0]]), torch.tensor([[-1.0]])]
    assert torch.allclose(merge("ties", y, [2.0, 1.0, 1.0], density=1.0), torch.tensor([[2.0]]))


def test_ties_keeps_ceil_density_entries_per_vector():
    out = merge("ties", [A], density=0.25)  # 24 entries -> 6 kept
    assert int((out != 0).sum()) == 6
    kept = out[out != 0].abs()
    assert kept.min() >= A.abs().flatten().topk(6).values.min()
    assert int((merge("ties", [A], density=1e-6) != 0).sum()) == 1  # at least one survives
    assert merge("ties", [A]).ne(0).sum() == 5  # default density 0.2 of 24 -> ceil(4.8)
    assert parse_params("ties", {}).density == 0.2


def test_dare_rescales_survivors_and_is_deterministic():
    out = merge("dare", [A], p=0.5, seed=7)
    kept = out != 0
    assert torch.allclose(out[kept], A[kept] / 0.5)
    assert 0 < int(kept.sum()) < A.numel()
    assert torch.equal(merge("dare", [A], p=0.5, seed=7), out)
    assert not torch.equal(merge("dare", [A], p=0.5, seed=8), out)
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand((1, 4, 6), generator=gen)[0] >= 0.5
    assert torch.equal(kept, mask)


def test_dare_without_dropping_is_weighted_sum():
    out = merge("dare", [A, B], [0.5, 2.0], p=0.0, coefficient=0.7)
    assert torch.allclose(out, merge("weighted", [A, B], [0.5, 2.0], coefficient=0.7), atol=1e-6)


def test_dare_expectation_is_the_weighted_sum():
    x = torch.ones(20, 50)
    y = torch.full((20, 50), -2.0)
    avg = torch.stack([merge("dare", [x, y], [1.0, 0.5], p=0.6, seed=s) for s in range(400)]).mean(0)
    target = x + 0.5 * y  # zeros
    assert (avg - target).abs().mean() < 0.1
    drops = torch.stack([merge("dare", [x], p=0.6, seed=s) == 0 for s in range(50)]).float().mean()
    assert drops.item() == pytest.approx(0.6, abs=0.02)


def test_dare_masks_depend_on_input_order():
    a = merge("dare", [A, B], p=0.5, seed=1)
    b = merge("dare", [B, A], p=0.5, seed=1)
    assert not torch.equal(a, b)


def test_unknown_method_lists_the_names():
    with pytest.raises(MergeError) as err:
        merge("task_arithmetic", [A])
    for name in MERGE_METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", {"density": 0.0}), ("ties", {"density": 1.5}), ("ties", {"density": float("nan")}),
        ("ties", {"density": -0.1}), ("dare", {"p": 1.0}), ("dare", {"p": -0.1}), ("dare", {"seed": -1}),
        ("dare", {"p": float("nan")}), ("sum", {"density": 0.5}), ("weighted", {"coefficient": float("inf")}),
        ("weighted", {"coefficient": float("nan")}), ("ties", {"densty": 0.5}),
    ],
)
def test_bad_params(method, params):
    with pytest.raises(MergeError, match=f"bad parameters for merge method '{method}'"):
        merge(method, [A, B] if method != "negate" else [A], **params)


def test_bad_inputs():
    with pytest.raises(MergeError, match="at least 1"):
        merge("sum", [])
    with pytest.raises(MergeError, match="at most 1"):
        merge("negate", [A, B])
    with pytest.raises(MergeError, match="3 weight"):
        merge("weighted", [A, B], [1.0, 2.0, 3.0])
    with pytest.raises(MergeError, match="finite"):
        merge("weighted", [A, B], [1.0, float("nan")])
    with pytest.raises(MergeError, match="finite"):
        merge("ties", [A, B], [float("inf"), 1.0])
    with pytest.raises(MergeError, match="takes no weights"):
        merge("sum", [A, B], [1.0, 2.0])
    with pytest.raises(MergeError, match="takes no weights"):
        merge("mean", [A, B], [0.5, 0.5])
    assert torch.allclose(merge("sum", [A, B], [1.0, 1.0]), A + B)  # unit weights are fine
    with pytest.raises(MergeError, match="different shapes"):
        merge("sum", [A, _randn(4, 7)])
    nan = A.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        merge("sum", [nan])
    with pytest.raises(MergeError, match="tensors"):
        merge("sum", [[1.0, 2.0]])  # type: ignore[list-item]


def test_ties_refuses_a_negative_weight_other_methods_take_it():
    """TIES elects signs and divides by the agreeing weights: -1 * tau would come back as +tau, so it is refused;
    the linear methods subtract as asked."""
    with pytest.raises(MergeError, match="negative"):
        merge("ties", [A], [-1.0], density=1.0)
    with pytest.raises(MergeError, match="negative"):
        check_inputs("ties", 2, [1.0, -0.5])
    assert torch.equal(merge("weighted", [A], [-1.0]), -A)
    assert torch.allclose(merge("dare", [A, B], [1.0, -1.0], p=0.0), A - B)
