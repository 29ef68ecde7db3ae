"""The addition experiment's library half on a tiny real model, with constructed vectors whose answers are known."""

from __future__ import annotations

import pytest
import torch
from task_data import sentiment_rows, write_builtin_task

from tpv.addition import (
    Combination,
    choose_coefficient,
    coefficient_grid,
    label_relation,
    run_addition,
)
from tpv.backbone import Backbone, BackboneConfig
from tpv.evaluate import evaluate
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split
from tpv.vectors import TaskPromptVector

L = 4


@pytest.fixture(scope="module")
def setup(tiny_causal_path, tmp_path_factory):
    write_builtin_task("imdb", sentiment_rows())
    write_builtin_task("yelp", sentiment_rows("!"))
    backbone = Backbone.load(BackboneConfig(model=str(tiny_causal_path)))
    store = VectorStore(tmp_path_factory.mktemp("addition") / "store")
    v = 3.0 * torch.randn(L, backbone.hidden_size, generator=torch.Generator().manual_seed(1))
    # imdb's vector is v; yelp's is zero: every combined prompt is O + c * v
    store.put(TaskPromptVector.create(v, task="imdb", backbone_id=backbone.backbone_id, origin_seed=0, source="x"))
    store.put(TaskPromptVector.create(torch.zeros(L, backbone.hidden_size), task="yelp",
                                      backbone_id=backbone.backbone_id, origin_seed=0, source="x"))
    return backbone, store, v


def _metric(backbone, prompt, task, split="test"):
    spec = get_task(task)
    return evaluate(backbone, prompt, spec, load_split(task, split, seed=0))[spec.metric]


def test_the_grid_is_the_papers():
    assert coefficient_grid() == [round(0.05 * i, 10) for i in range(21)]
    assert coefficient_grid(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_label_relations():
    assert label_relation(["imdb", "yelp"]) == "same"
    assert label_relation(["rotten_tomatoes", "tweets"]) == "overlapping"  # negative/positive vs +neutral
    assert label_relation(["rotten_tomatoes", "trec"]) == "disjoint"


def test_known_answers_of_the_addition(setup):
    backbone, store, v = setup
    origin = make_origin(backbone, L, 0)
    result = run_addition(backbone, store, ["imdb", "yelp"], 0, source="x", grid=[0.0, 0.5, 1.0])
    # every grid row is the members' validation metric of O + c * v, computed here independently
    for row in result.grid:
        prompt = origin + row["coefficient"] * v
        for task in ("imdb", "yelp"):
            assert row[task] == pytest.approx(_metric(backbone, prompt, task, "validation"))
        assert row["mean"] == pytest.approx((row["imdb"] + row["yelp"]) / 2)
    assert result.coefficient == choose_coefficient(result.grid)["coefficient"]
    assert result.labels == "same" and result.weights == [1.0, 1.0]
    chosen = origin + result.coefficient * v
    imdb, yelp = result.members
    assert imdb.single == pytest.approx(_metric(backbone, origin + v, "imdb"))  # O + tau_imdb
    assert yelp.single == pytest.approx(_metric(backbone, origin, "yelp"))  # tau_yelp = 0: the origin itself
    assert imdb.combined == pytest.approx(_metric(backbone, chosen, "imdb"))
    assert yelp.combined == pytest.approx(_metric(backbone, chosen, "yelp"))
    assert imdb.retention == pytest.approx(imdb.combined / imdb.single)


def test_at_c_one_the_sum_with_a_zero_vector_keeps_everything(setup):
    backbone, store, _ = setup
    result = run_addition(backbone, store, ["imdb", "yelp"], 0, source="x", grid=[1.0])
    assert result.coefficient == 1.0
    assert result.members[0].combined == result.members[0].single  # O + 1 * (v + 0) is imdb's own prompt
    assert result.members[0].retention == 1.0


def test_fixed_weights_skip_the_grid(setup):
    backbone, store, v = setup
    result = run_addition(backbone, store, ["imdb", "yelp"], 0, source="x", weights=[0.25, 2.0])
    assert result.grid == [] and result.coefficient == 1.0 and result.weights == [0.25, 2.0]
    assert result.members[1].combined == pytest.approx(_metric(backbone, make_origin(backbone, L, 0) + 0.25 * v, "yelp"))


def test_choose_coefficient_breaks_ties_by_logprob_then_smaller_c():
    rows = [{"coefficient": 0.5, "mean": 0.8, "label_logprob": -0.5},
            {"coefficient": 0.2, "mean": 0.8, "label_logprob": -0.5},
            {"coefficient": 1.0, "mean": 0.8, "label_logprob": -0.4},
            {"coefficient": 0.1, "mean": 0.7, "label_logprob": -0.1}]
    assert choose_coefficient(rows)["coefficient"] == 1.0
    assert choose_coefficient(rows[:2])["coefficient"] == 0.2


def test_a_missing_vector_is_named(setup):
    backbone, store, _ = setup
    from tpv.compose import UnknownVector

    with pytest.raises(UnknownVector, match="'imdb'"):
        Combination(backbone, store, ["imdb", "yelp"], 5, source="x")
