"""Each transfer init's starting prompt, the exact tensor a run starts from, against its definition in the paper."""

from __future__ import annotations

import pytest
import torch

from test_train import write_sentiment_task
from tpv.backbone import Backbone, BackboneConfig
from tpv.evaluate import evaluate
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split
from tpv.train import TrainConfig, initial_prompt
from tpv.vectors import TaskPromptVector
from tune_jobs.transfer import TRANSFER_INITS, Cell, TransferConfig

L = 4
#: per source: origin seed -> its run's validation accuracy (seed 1 is source_a's best run, seed 0 source_b's)
RUNS = {"init_source_a": {0: 0.6, 1: 0.9}, "init_source_b": {0: 0.7, 1: 0.5}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_causal_path):
    """A tiny backbone, a target task and a store of two source tasks, two runs each (tau 3x an origin's scale)."""
    folder = tmp_path_factory.mktemp("inits")
    target = write_sentiment_task(folder, "init_target")
    for name in RUNS:
        write_sentiment_task(folder, name)
    backbone = Backbone.load(BackboneConfig(model=str(tiny_causal_path), dtype="float32"))
    store = VectorStore(folder / "store")
    tuned = {}
    for k, (task, runs) in enumerate(RUNS.items()):
        for seed, accuracy in runs.items():
            origin = make_origin(backbone, L, seed)
            prompt = origin + 3 * torch.randn(origin.shape, generator=torch.Generator().manual_seed(10 * k + seed))
            tuned[(task, seed)] = prompt
            store.put(TaskPromptVector.from_prompts(prompt, origin, task=task, backbone_id=backbone.backbone_id,
                                                    origin_seed=seed, metrics={"accuracy": accuracy}))
    return backbone, store, target, tuned


def start(setup, init: str, seed: int = 10, **fields) -> torch.Tensor:
    """The prompt a transfer run of `init` on origin `seed` starts from."""
    backbone, store, target, _ = setup
    config = TransferConfig(targets={target: list(RUNS)}, seeds=[seed], **fields)
    spec = TRANSFER_INITS[init].build(Cell(config, store, backbone.backbone_id, L, target, list(RUNS), seed, {}))
    train = TrainConfig(task=target, backbone=BackboneConfig(model=backbone.config.model), prompt_length=L, seed=seed,
                        eval_examples=None, init=spec, progress=False)
    return initial_prompt(train, backbone, make_origin(backbone, L, seed), store)


def test_random_starts_from_the_runs_origin(setup):
    torch.testing.assert_close(start(setup, "random", seed=10), make_origin(setup[0], L, 10), rtol=0, atol=0)


def test_spot_starts_from_one_source_runs_tuned_prompt(setup):
    """The best source run on its validation by default (source_a's seed 1), never a mean over its runs."""
    tuned = setup[3]
    torch.testing.assert_close(start(setup, "spot"), tuned[("init_source_a", 1)], rtol=0, atol=1e-6)
    # paired as the paper's scripts pair them: the source run on the target run's origin seed
    torch.testing.assert_close(start(setup, "spot", seed=0, spot_run="same_seed"), tuned[("init_source_a", 0)],
                               rtol=0, atol=1e-6)


def test_multi_spot_is_the_mean_of_the_sources_spot_prompts(setup):
    tuned = setup[3]
    expected = (tuned[("init_source_a", 1)] + tuned[("init_source_b", 0)]) / 2
    torch.testing.assert_close(start(setup, "multi_spot"), expected, rtol=0, atol=1e-6)


def test_tpv_chooses_c_on_the_targets_validation(setup):
    """O + c * (tau_a + tau_b), each tau the mean over its task's seeds, c the grid point (0, 0.05, ..., 1) best on
    the target's validation (ties: better label log-probability, then smaller c); a fixed c is taken as given."""
    backbone, store, target, tuned = setup
    origin = make_origin(backbone, L, 10)
    taus = {t: sum(tuned[(t, s)] - make_origin(backbone, L, s) for s in runs) / len(runs) for t, runs in RUNS.items()}
    direction = sum(taus.values())
    task, dev = get_task(target), load_split(target, "validation", seed=0)
    candidates = []
    for i in range(21):
        c = i / 20
        metrics = evaluate(backbone, origin + c * direction, task, dev)
        candidates.append(((metrics["accuracy"], metrics["label_logprob"], -c), c))
    chosen = max(candidates)[1]
    assert chosen != 1.0  # the fixture makes c = 1 (the old unchosen default) the wrong answer
    torch.testing.assert_close(start(setup, "tpv"), origin + chosen * direction, rtol=0, atol=1e-5)
    torch.testing.assert_close(start(setup, "tpv", tpv_coefficient=0.3), origin + 0.3 * direction, rtol=0, atol=1e-5)
