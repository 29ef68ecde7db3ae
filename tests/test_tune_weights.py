"""The combination-weight search finds the best weight of a constructed case, through real Ray Tune trials.

The case: every text of the task appears once with each label, so the best a prompt can do is to be calibrated
(p = 1/2 per label); a prompt tuned towards that gives a vector tau, and the stored vector is 0.4 * tau, so the
objective (mean log-probability of the right label) along O + c * v rises from the origin and peaks inside the
grid. The best weight is known by evaluating every grid point directly, in this process; the searches must find
it (the paper's grid exactly, Optuna's per-vector search within a grid step or two).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_sharp_causal

from tpv.paths import data_dir

pytestmark = pytest.mark.usefixtures("ray_session")

TEXTS = ["the movie was great", "a waste of time", "great fun", "terrible and boring", "wonderful acting",
         "the film was boring", "what a story", "not for me", "i liked the music", "the plot was thin",
         "a fine cast", "too long"]


@pytest.fixture(scope="module")
def peaky_model(tiny_causal_path, tmp_path_factory):
    """The tiny model with weights scaled up (std ~0.15 instead of 0.02), so that a 4-row prompt visibly moves
    its label scores; at the default scale a prompt barely matters to a random 2-layer model."""
    return build_sharp_causal(tmp_path_factory.mktemp("models") / "tiny-peaky", scale=7.5, base=tiny_causal_path)


@pytest.fixture(scope="module")
def case(peaky_model, tmp_path_factory):
    from tpv.backbone import Backbone, BackboneConfig
    from tpv.evaluate import evaluate
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task, load_split
    from tpv.train import TrainConfig, train
    from tpv.vectors import TaskPromptVector

    folder = data_dir() / "amazon"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": t, "label": y} for t in TEXTS for y in (0, 1)]
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps({"task": "amazon"}))

    config = BackboneConfig(model=str(peaky_model))
    backbone = Backbone.load(config)
    tuned = train(TrainConfig(task="amazon", backbone=config, prompt_length=4, lr=0.1, warmup_steps=0, batch_size=8,
                              max_steps=40, eval_every=40, eval_examples=None, schedule="constant", progress=False),
                  backbone)
    tau = tuned.tuned - tuned.origin
    store_path = tmp_path_factory.mktemp("weights") / "store"
    store = VectorStore(store_path)
    vector = TaskPromptVector.create(0.4 * tau, task="amazon", backbone_id=backbone.backbone_id, origin_seed=0)
    store.put(vector)

    origin = make_origin(backbone, 4, 0)
    dev = load_split("amazon", "validation")
    task = get_task("amazon")

    def objective(c: float) -> float:
        return evaluate(backbone, origin + c * vector.tensor, task, dev)["label_logprob"]

    grid = [round(0.05 * i, 10) for i in range(21)]
    values = {c: objective(c) for c in grid}
    return {"store": store_path, "vector_id": vector.vector_id, "values": values, "objective": objective,
            "origin": origin, "vector": vector, "backbone_id": backbone.backbone_id, "model": peaky_model}


def test_the_constructed_case_has_an_interior_best(case):
    values = case["values"]
    best = max(values, key=values.get)
    assert 0.1 <= best <= 0.9, values  # the best weight is inside the grid, not at an end
    assert values[best] - min(values[0.0], values[1.0]) > 0.05  # and clearly better than the ends


def test_weight_search_finds_the_known_best(case, tmp_path):
    from tpv.compose import Composer
    from tpv.store import VectorStore
    from tune_jobs.config import Resources
    from tune_jobs.locations import Locations
    from tune_jobs.weights import WeightSearchConfig, run_search

    values = case["values"]
    best_c = max(values, key=values.get)
    config = WeightSearchConfig(
        target="amazon", sources=[case["vector_id"]], name="amazon-tpv", backbone=str(case["model"]),
        modes=["paper", "per_vector"], grid_step=0.05, metric="label_logprob", samples=16, seed=0,
        weight_min=0.0, weight_max=1.0, eval_examples=None, resources=Resources(max_concurrent=1),
        locations=Locations(store=str(case["store"]), storage_path=str(tmp_path / "ray_results"),
                            out_dir=str(tmp_path / "reports")),
    )
    result = run_search(config)
    paper = result["found"]["paper"]
    assert len(result["tables"]["paper"]) == 21  # 0, 0.05, ..., 1
    assert values[paper["coefficient"]] >= values[best_c] - 1e-4  # the paper rule picks the known best
    assert paper["objective"] == pytest.approx(values[paper["coefficient"]], abs=1e-4)

    per_vector = result["found"]["per_vector"]
    w = per_vector["weights"][0]
    assert len(result["tables"]["per_vector"]) == 16
    assert abs(w - best_c) <= 0.1, (w, best_c)  # Optuna lands next to the known best weight
    spread = max(values.values()) - min(values.values())
    assert case["objective"](w) >= values[best_c] - 0.1 * spread

    store = VectorStore(case["store"])
    assert set(store.list_compositions(case["backbone_id"])) == {"amazon-tpv", "amazon-tpv-paper",
                                                                 "amazon-tpv-weights"}
    composer = Composer(store, lambda length, seed: case["origin"])
    best_mode = result["best_mode"]
    row = result["found"][best_mode]
    expected = case["origin"] + row["coefficient"] * row["weights"][0] * case["vector"].tensor
    torch.testing.assert_close(composer.compose_named(case["backbone_id"], "amazon-tpv"), expected)
    assert composer.named(case["backbone_id"], "amazon-tpv-paper").coefficient == paper["coefficient"]
