"""The main job's serve stage end to end: a tiny real model, a real store, a real local Ray, real HTTP."""

from __future__ import annotations

import pytest
import torch
from task_data import sentiment_rows, write_builtin_task

from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import Composer, CompositionBody
from tpv.store import VectorStore
from tpv.tasks import load_split
from tpv.vectors import TaskPromptVector

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def imdb_vectors(model_path, tmp_path) -> tuple[Backbone, VectorStore]:
    """imdb data and two imdb vectors of one job (origins 0 and 1, source 'tpv sweep x') in a fresh store."""
    write_builtin_task("imdb", sentiment_rows())
    backbone = Backbone.load(BackboneConfig(model=str(model_path)))
    store = VectorStore(tmp_path / "store")
    for seed in (0, 1):
        tau = 2.0 * torch.randn(4, backbone.hidden_size, generator=torch.Generator().manual_seed(seed))
        store.put(TaskPromptVector.create(tau, task="imdb", backbone_id=backbone.backbone_id, origin_seed=seed,
                                          source="tpv sweep x"))
    return backbone, store


def test_served_scores_equal_offline_ones(tiny_causal_path, tmp_path):
    from tune_jobs.serve_check import ServeAlreadyRunning, serve_and_check

    backbone, store = imdb_vectors(tiny_causal_path, tmp_path)
    # the composition is the two vectors' seed-mean on origin 10
    body = CompositionBody(terms=[{"task": "imdb", "seeds": [0, 1], "source": "tpv sweep x"}])
    Composer(store, lambda n, s: None).save_named("imdb-tpv", body.applied(backbone.backbone_id, 10, 4))

    examples = load_split("imdb", "test", seed=0)
    check = serve_and_check(str(tmp_path / "store"), str(tiny_causal_path), "imdb-tpv", "imdb", examples, num_cpus=1,
                            batch=3)
    assert check.examples == len(examples) == 8
    assert check.max_prob_diff < 1e-4  # the served probabilities are tpv's own
    assert check.served_accuracy == check.offline_accuracy
    assert check.url.startswith("http://127.0.0.1:")

    from ray import serve

    assert not serve.status().proxies  # the check shut its own Serve down
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        with pytest.raises(ServeAlreadyRunning):  # a running Serve (someone's apps) is never touched
            serve_and_check(str(tmp_path / "store"), str(tiny_causal_path), "imdb-tpv", "imdb", examples)
    finally:
        serve.shutdown()


def test_the_demo_serves_the_composition_whose_c_scores_best_on_validation(tiny_causal_path, tmp_path):
    import csv
    from argparse import Namespace

    from tune_jobs.config import Resources
    from tune_jobs.locations import Locations
    from tune_jobs.main_job import serve_stage

    backbone, store = imdb_vectors(tiny_causal_path, tmp_path)
    where = Locations(store=str(tmp_path / "store"), storage_path=str(tmp_path / "ray_results"),
                      out_dir=str(tmp_path / "reports"))
    args = Namespace(target="imdb", seeds=[0, 1], transfer_seeds=[10], backbone=str(tiny_causal_path))
    served = serve_stage(args, ["imdb"], "tpv sweep x", "imdb-tpv", Resources(cpus_per_trial=1), where)

    with open(tmp_path / "reports" / "imdb-tpv" / "weights.csv") as f:
        grid = [(float(r["coefficient"]), float(r["objective"])) for r in csv.DictReader(f)]
    assert [c for c, _ in grid] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # the demo's addition grid
    best = max(grid, key=lambda r: (r[1], -r[0]))[0]
    assert served["served_coefficient"] == best
    spec = Composer(store, lambda n, s: None).named(backbone.backbone_id, "imdb-tpv")
    assert (spec.coefficient, spec.origin_seed) == (best, 10)
    assert [(t.task, t.seeds, t.source, t.weight) for t in spec.terms] == [("imdb", [0, 1], "tpv sweep x", 1.0)]
    assert served["served_max_prob_diff"] < 1e-4 and served["served_accuracy"] == served["offline_accuracy"]
