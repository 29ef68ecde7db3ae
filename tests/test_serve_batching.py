"""The serving logic without Serve: per-composition prompt cache, hot reload, one forward for mixed compositions.

Real tiny models and a real store; every expected value is computed the plain library way (compose offline, then
`backbone.score_labels` with the prompt tensor, one request at a time).
"""

from __future__ import annotations

import time

import pytest
import torch

from serve.batching import (
    BatchReport,
    GenerateItem,
    PromptEntry,
    PromptServer,
    ScoreItem,
    _stacked_prompt,
    gathers_prefixes,
    generate_batch,
    prompt_cache,
    score_batch,
)
from tpv.backbone import Backbone, BackboneConfig, PromptPrefix
from tpv.compose import Composer, CompositionSpec
from tpv.generate import SamplingParams, Transcript
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.vectors import TaskPromptVector

L = 6
SOURCES = [
    "sentence: the movie was great and the acting was wonderful sentiment:",
    "sentence: the film was terrible and boring, a waste of time sentiment:",
    "sentence: what is the capital of france? sentiment:",
    "premise: the movie was great hypothesis: the film was boring answer:",
    "sentence: business sport politics tech sentiment:",
]
ONE_TOKEN = ("no", "yes")  # one token each on the tiny tokenizer: the last-position fast path
OTHER_ONE = ("was", "the", "no")  # another one-token label set: shares the causal fast-path forward
MULTI = ("true", "false", "neither")  # several tokens each: one row per (source, label)


def _vector(task: str, backbone: Backbone, seed: int, scale: float = 0.5, vector_id: str | None = None,
            origin_seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(L, backbone.hidden_size, generator=g) * scale
    return TaskPromptVector.create(tau, task=task, backbone_id=backbone.backbone_id, origin_seed=origin_seed,
                                   vector_id=vector_id)


@pytest.fixture(scope="module")
def causal(tiny_causal_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_causal_path), device="cpu"))


@pytest.fixture(scope="module")
def t5(tiny_t5_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_t5_path), device="cpu"))


def _store(tmp_path, backbone: Backbone) -> VectorStore:
    store = VectorStore(tmp_path / "store")
    for i, task in enumerate(["sentiment", "nli", "topic"]):
        for seed in range(2):
            store.put(_vector(task, backbone, 10 * i + seed, origin_seed=seed))  # one vector per origin seed
    return store


def _specs(backbone: Backbone) -> list[CompositionSpec]:
    bb = backbone.backbone_id
    return [
        CompositionSpec(backbone_id=bb, terms=[{"task": "sentiment"}], origin_seed=0, prompt_length=L),
        CompositionSpec(backbone_id=bb, terms=[{"task": "nli", "weight": 0.7}, {"task": "topic", "weight": 0.3}],
                        origin_seed=1, prompt_length=L),
        CompositionSpec(backbone_id=bb, terms=[{"task": "topic", "weight": -0.5}], origin_seed=2, prompt_length=L,
                        coefficient=2.0),
    ]


def _offline(backbone: Backbone, store: VectorStore, spec: CompositionSpec, sources, labels) -> torch.Tensor:
    prompt = Composer(store, lambda n, s: make_origin(backbone, n, s)).compose(spec)
    return backbone.score_labels(prompt.unsqueeze(0), list(sources), list(labels))


@pytest.mark.parametrize("which", ["causal", "t5"])
def test_mixed_batch_one_forward_equals_each_alone(which, request, tmp_path):
    backbone = request.getfixturevalue(which)
    store = _store(tmp_path, backbone)
    server = PromptServer(backbone, store, reload_interval_s=3600)
    specs = _specs(backbone)
    entries = [server.entry(s) for s in specs]
    requests = [  # (composition, rows, label set): 3 compositions x 3 label sets, uneven row counts
        (0, SOURCES[:2], ONE_TOKEN), (1, SOURCES[3:4], MULTI), (2, SOURCES[1:5], ONE_TOKEN),
        (1, SOURCES[:3], OTHER_ONE), (0, SOURCES[2:3], MULTI), (2, SOURCES[4:5], ONE_TOKEN),
    ]
    items = [ScoreItem(entries[c], list(src), labels) for c, src, labels in requests]
    results, report = score_batch(backbone, items)
    assert report.requests == 6 and report.rows == sum(len(s) for _, s, _ in requests)
    if which == "causal":  # one-token label sets share one forward (last position), multi-token ones get their own
        assert report.forwards == 2
        assert sorted((g["label_sets"], g["compositions"]) for g in report.groups) == [(1, 2), (2, 3)]
    else:  # seq2seq scores every (source, label) pair: one forward per label set
        assert report.forwards == 3
    for (c, src, labels), got in zip(requests, results):
        alone, _ = score_batch(backbone, [ScoreItem(entries[c], list(src), labels)])
        expected = _offline(backbone, store, specs[c], src, labels)
        assert got.shape == (len(src), len(labels))
        torch.testing.assert_close(got, alone[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # different compositions really do give different scores (the test would not see a mix-up otherwise)
    a = score_batch(backbone, [ScoreItem(entries[0], SOURCES[:2], ONE_TOKEN)])[0][0]
    b = score_batch(backbone, [ScoreItem(entries[1], SOURCES[:2], ONE_TOKEN)])[0][0]
    assert (a - b).abs().max() > 1e-3


def test_mixed_compositions_gather_cached_keys_values_on_a_cpu_and_stack_prompts_on_a_gpu(causal, tmp_path):
    assert gathers_prefixes("cpu") and not gathers_prefixes("cuda:0")
    server = PromptServer(causal, _store(tmp_path, causal), reload_interval_s=3600)
    entries = [server.entry(s) for s in _specs(causal)[:2]]
    gathered = _stacked_prompt(causal, entries, [0, 1, 1])  # this backbone is on the CPU
    assert isinstance(gathered, PromptPrefix) and gathered.rows == 3
    stacked = torch.stack([entries[j].prompt for j in [0, 1, 1]])  # what a GPU batch runs
    torch.testing.assert_close(causal.score_labels(gathered, SOURCES[:3], list(ONE_TOKEN)),
                               causal.score_labels(stacked, SOURCES[:3], list(ONE_TOKEN)), atol=1e-4, rtol=0)


def test_causal_entries_carry_the_prompt_prefix_and_are_reused(causal, tmp_path):
    store = _store(tmp_path, causal)
    server = PromptServer(causal, store, reload_interval_s=3600)
    spec = _specs(causal)[1]
    first = server.entry(spec)
    assert first.prefix is not None and first.prefix.rows == 1 and first.prefix.length == L
    before = server.composer.cache_info().misses
    # an equivalent spec (terms in another order, weighted is commutative) hits the same entry: nothing recomputed
    reordered = {**spec.model_dump(), "terms": spec.model_dump()["terms"][::-1]}
    again = server.entry(CompositionSpec.model_validate(reordered))
    assert again is first and server.cached(spec) is first
    assert server.composer.cache_info().misses == before
    assert server.cache.info().hits >= 2
    # ONE cache per replica: the composer keeps nothing, so the byte bound is spent once
    assert server.composer.cache_info().entries == 0 and server.composer.cache_info().bytes == 0
    assert server.cache.info().bytes == first.nbytes()
    # scoring twice through the cached prefix leaves it untouched
    one = score_batch(causal, [ScoreItem(first, SOURCES[:3], ONE_TOKEN)])[0][0]
    two = score_batch(causal, [ScoreItem(first, SOURCES[:3], ONE_TOKEN)])[0][0]
    assert torch.equal(one, two)


def test_prompt_cache_is_bounded_in_entries_and_bytes(causal, tmp_path):
    store = _store(tmp_path, causal)
    server = PromptServer(causal, store, reload_interval_s=3600, cache_max_entries=2)
    specs = _specs(causal)
    entries = [server.entry(s) for s in specs]
    info = server.cache.info()
    assert info.entries == 2 and info.evictions == 1
    assert server.cached(specs[0]) is None and server.cached(specs[2]) is entries[2]  # least recently used went
    size = entries[0].nbytes()
    cache = prompt_cache(max_entries=100, max_bytes=2 * size + size // 2)
    for e in entries:
        cache.put((e.version, e.key), e)
    assert len(cache) == 2 and cache.info().bytes == 2 * size and cache.info().evictions == 1
    assert cache.get((entries[0].version, entries[0].key)) is None
    assert cache.get((entries[2].version, entries[2].key)) is entries[2]
    tiny = prompt_cache(max_entries=100, max_bytes=size - 1)
    tiny.put((entries[0].version, entries[0].key), entries[0])  # larger than the whole budget: not kept
    assert len(tiny) == 0
    assert cache.drop(lambda key: key[0] != "another-version") == 2
    assert len(cache) == 0 and cache.info().bytes == 0


def test_hot_reload_replaced_vector_and_named_composition(causal, tmp_path):
    store = _store(tmp_path, causal)
    bb = causal.backbone_id
    store.put(_vector("swap", causal, 100, vector_id="swap-v"))
    store.put_composition(bb, "mix", {"backbone_id": bb, "terms": [{"vector_id": "swap-v"}], "origin_seed": 0,
                                      "prompt_length": L})
    lazy = PromptServer(causal, store, reload_interval_s=3600)
    eager = PromptServer(causal, store, reload_interval_s=0.2)
    old_lazy, old_eager = lazy.entry(lazy.named("mix")), eager.entry(eager.named("mix"))
    torch.testing.assert_close(old_lazy.prompt, old_eager.prompt)

    time.sleep(0.02)  # distinct mtimes
    store.put(_vector("swap", causal, 101, vector_id="swap-v"), overwrite=True)
    # within the window the lazy server may still serve the old one; after it, the eager one must not
    assert lazy.entry(lazy.named("mix")) is old_lazy
    time.sleep(0.25)
    fresh = eager.entry(eager.named("mix"))
    assert fresh is not old_eager and eager.watcher.reloads == 1
    expected = Composer(store, lambda n, s: make_origin(causal, n, s)).compose(eager.named("mix"))
    torch.testing.assert_close(fresh.prompt, expected)
    assert (fresh.prompt - old_eager.prompt).abs().max() > 1e-3
    # a forced check (what reconfigure does) ends the lazy server's window at once
    lazy.version(force=True)
    torch.testing.assert_close(lazy.entry(lazy.named("mix")).prompt, expected)

    # a named composition replaced in the store: the new spec is served, the old entry never again
    store.put_composition(bb, "mix", {"backbone_id": bb, "terms": [{"task": "topic", "weight": 0.5}],
                                      "origin_seed": 3, "prompt_length": L}, overwrite=True)
    time.sleep(0.25)
    spec = eager.named("mix")
    assert spec.origin_seed == 3 and spec.terms[0].task == "topic"
    torch.testing.assert_close(
        eager.entry(spec).prompt, Composer(store, lambda n, s: make_origin(causal, n, s)).compose(spec)
    )
    # a vector written after start becomes usable, and shows in the listing
    store.put(_vector("late", causal, 7))
    time.sleep(0.25)
    assert "late" in {m.task for m in eager.metas()}
    eager.entry(CompositionSpec(backbone_id=bb, terms=[{"task": "late"}], origin_seed=0, prompt_length=L))


def test_generate_batch_one_loop_for_mixed_compositions_and_lengths(causal, tmp_path):
    """Requests of four compositions (two prompt lengths) and different token bounds decode in one loop; a request
    that is done gets None while the others go on; each equals its rows generated alone."""
    store = _store(tmp_path, causal)
    g = torch.Generator().manual_seed(5)
    store.put(TaskPromptVector.create(torch.randn(L + 2, causal.hidden_size, generator=g) * 0.5, task="longer",
                                      backbone_id=causal.backbone_id, origin_seed=0))
    server = PromptServer(causal, store, reload_interval_s=3600)
    entries = [server.entry(s) for s in _specs(causal)]
    entries.append(server.entry(CompositionSpec(backbone_id=causal.backbone_id, terms=[{"task": "longer"}],
                                                origin_seed=0, prompt_length=L + 2)))

    def greedy(rows: int, n: int) -> list[SamplingParams]:
        return [SamplingParams(max_new_tokens=n)] * rows

    items = [GenerateItem(entries[0], SOURCES[:2], greedy(2, 4)), GenerateItem(entries[1], SOURCES[2:3], greedy(1, 2)),
             GenerateItem(entries[2], SOURCES[3:5], greedy(2, 3)), GenerateItem(entries[3], SOURCES[:1], greedy(1, 4))]
    report = BatchReport()
    steps = list(generate_batch(causal, items, report))
    assert report.forwards == len(steps) <= 4 and report.rows == 6 and report.compositions == 4
    assert steps[0][1] is not None and all(step[1] is None for step in steps[2:])
    for k, item in enumerate(items):
        transcript = Transcript(item.rows)
        for step in steps:
            if step[k] is not None:
                transcript.add(step[k])
        alone = causal.generate(item.entry.prompt.unsqueeze(0).expand(item.rows, -1, -1), item.sources,
                                max_new_tokens=item.params[0].max_new_tokens)
        assert [t.strip() for t in transcript.texts] == alone


def test_entries_of_different_prompt_lengths_never_share_a_forward(causal, tmp_path):
    store = _store(tmp_path, causal)
    g = torch.Generator().manual_seed(5)
    store.put(TaskPromptVector.create(torch.randn(L + 2, causal.hidden_size, generator=g) * 0.5, task="longer",
                                      backbone_id=causal.backbone_id, origin_seed=0))
    server = PromptServer(causal, store, reload_interval_s=3600)
    short = server.entry(_specs(causal)[0])
    long = server.entry(CompositionSpec(backbone_id=causal.backbone_id, terms=[{"task": "longer"}], origin_seed=0,
                                        prompt_length=L + 2))
    assert isinstance(long, PromptEntry) and long.prompt_length == L + 2
    results, report = score_batch(causal, [ScoreItem(short, SOURCES[:2], ONE_TOKEN),
                                           ScoreItem(long, SOURCES[:2], ONE_TOKEN)])
    assert report.forwards == 2
    torch.testing.assert_close(results[1], score_batch(causal, [ScoreItem(long, SOURCES[:2], ONE_TOKEN)])[0][0])
