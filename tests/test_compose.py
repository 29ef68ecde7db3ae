"""CompositionSpec validation and the Composer (origin + merged vectors, LRU cache) over a real store."""

import json
import threading

import pytest
import torch
from pydantic import ValidationError

from tpv.compose import (
    Composer,
    CompositionBody,
    CompositionError,
    CompositionSpec,
    CompositionTerm,
    UnknownVector,
    prompt_length_of,
    task_vectors,
)
from tpv.merge import merge
from tpv.store import NotFound, VectorStore
from tpv.vectors import TaskPromptVector

BB, L, D = "t5-base", 5, 8


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def origin_fn(length: int, seed: int) -> torch.Tensor:
    """A deterministic stand-in for the backbone's make_origin: same (L, seed) -> same tensor."""
    return _randn(length, D, seed=10_000 + seed)


def _vec(seed: int, task: str, backbone: str = BB, length: int = L, hidden: int = D) -> TaskPromptVector:
    return TaskPromptVector.create(_randn(length, hidden, seed=seed), task=task, backbone_id=backbone, origin_seed=seed)


@pytest.fixture
def store(tmp_path):
    s = VectorStore(tmp_path)
    for seed in range(3):
        s.put(_vec(seed, "mnli"))
        s.put(_vec(10 + seed, "qnli"))
    return s


def _spec(*terms, **kw) -> CompositionSpec:
    return CompositionSpec(backbone_id=kw.pop("backbone_id", BB), terms=list(terms),
                           origin_seed=kw.pop("origin_seed", 0), prompt_length=kw.pop("prompt_length", L), **kw)


def _tau(store, task):
    return [store.get(m.vector_id).tensor for m in store.list(task=task)]


# ---- spec validation -----------------------------------------------------------------------------------------------

def test_term_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one"):
        CompositionTerm()
    with pytest.raises(ValidationError, match="exactly one"):
        CompositionTerm(task="a", vector_id="b")
    assert CompositionTerm(task="a").weight == 1.0


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 100.5, -101.0])
def test_bad_weights(weight):
    with pytest.raises(ValidationError):
        CompositionTerm(task="a", weight=weight)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"terms": []}, "at least 1"),
        ({"terms": [{"task": f"t{i}"} for i in range(33)]}, "at most 32"),
        ({"method": "avg"}, "known: dare, mean, negate, sum, ties, weighted"),
        ({"method": "ties", "params": {"density": 2.0}}, "density"),
        ({"method": "ties", "params": {"dens": 0.5}}, "dens"),
        ({"params": {"coefficient": 2.0}}, "on the spec"),
        ({"method": "negate", "terms": [{"task": "a"}, {"task": "b"}]}, "at most 1"),
        ({"method": "sum", "terms": [{"task": "a", "weight": 2.0}]}, "takes no weights"),
        ({"coefficient": float("nan")}, "coefficient"),
        ({"coefficient": 1000.0}, "coefficient"),
        ({"prompt_length": 0}, "prompt_length"),
        ({"origin_seed": -1}, "origin_seed"),
        ({"backbone_id": "../x"}, "backbone_id\n.*invalid name"),
        ({"terms": [{"task": "a/b"}]}, "terms.0.task\n.*invalid name"),
        ({"terms": [{"vector_id": ".."}]}, "terms.0.vector_id\n.*invalid name"),
        ({"terms": [{"task": "a\n"}]}, "terms.0.task\n.*invalid name"),
        ({"terms": [{"vector_id": "v", "seeds": [0]}]}, "narrow task terms"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_specs(change, match):
    data = {"backbone_id": BB, "terms": [{"task": "a"}], "origin_seed": 0, "prompt_length": L, **change}
    with pytest.raises(ValidationError, match=match):
        CompositionSpec.model_validate(data)


def test_canonical_is_order_free_for_commutative_methods_only():
    a, b = {"task": "mnli", "weight": 0.5}, {"vector_id": "x-s0-abc", "weight": 0.25}
    assert _spec(a, b).canonical() == _spec(b, a).canonical()
    assert _spec(a, b, method="ties").canonical() == _spec(b, a, method="ties").canonical()
    assert _spec(a, b, method="dare").canonical() != _spec(b, a, method="dare").canonical()
    assert _spec(a, b).canonical() != _spec(a, {**b, "weight": 0.3}).canonical()
    assert _spec(a, b).canonical() != _spec(a, b, origin_seed=1).canonical()
    # defaults are filled in, so equivalent params share a key
    assert _spec(a, method="ties").canonical() == _spec(a, method="ties", params={"density": 0.2}).canonical()
    data = json.loads(_spec(a, b).canonical())
    assert data["params"] == {} and data["method"] == "weighted"
    assert CompositionSpec.model_validate(data).canonical() == _spec(a, b).canonical()


# ---- composing -----------------------------------------------------------------------------------------------------

def test_weighted_composition_is_origin_plus_coefficient_times_weighted_sum(store):
    ids = [m.vector_id for m in store.list(task="mnli")]
    spec = _spec({"vector_id": ids[0], "weight": 0.5}, {"vector_id": ids[1], "weight": -2.0}, coefficient=0.4,
                 origin_seed=3)
    expected = origin_fn(L, 3) + 0.4 * (0.5 * store.get(ids[0]).tensor - 2.0 * store.get(ids[1]).tensor)
    assert torch.allclose(Composer(store, origin_fn).compose(spec), expected, atol=1e-6)


def test_task_term_is_the_mean_of_its_vectors(store):
    spec = _spec({"task": "mnli"}, {"task": "qnli", "weight": 0.5})
    mnli, qnli = torch.stack(_tau(store, "mnli")).mean(0), torch.stack(_tau(store, "qnli")).mean(0)
    out = Composer(store, origin_fn).compose(spec)
    assert torch.allclose(out, origin_fn(L, 0) + mnli + 0.5 * qnli, atol=1e-6)
    delta, parents = Composer(store, origin_fn).delta(spec)
    assert torch.allclose(delta, mnli + 0.5 * qnli, atol=1e-6)
    assert sorted(parents) == sorted(m.vector_id for m in store.list())


def test_single_vector_task_and_cross_origin(store):
    v = _vec(42, "rte")
    store.put(v)
    composer = Composer(store, origin_fn)
    for seed in (0, 7):  # the vector was made on origin 42; apply it to other origins
        out = composer.compose(_spec({"task": "rte"}, origin_seed=seed))
        assert torch.allclose(out, v.apply(origin_fn(L, seed)), atol=1e-6)


def test_other_methods_match_the_registry(store):
    composer = Composer(store, origin_fn)
    mnli, qnli = torch.stack(_tau(store, "mnli")).mean(0), torch.stack(_tau(store, "qnli")).mean(0)
    terms = ({"task": "mnli"}, {"task": "qnli", "weight": 2.0})
    for method, params in [("ties", {"density": 0.5}), ("dare", {"p": 0.3, "seed": 4})]:
        out = composer.compose(_spec(*terms, method=method, params=params, coefficient=0.7))
        expected = origin_fn(L, 0) + merge(method, [mnli, qnli], [1.0, 2.0], coefficient=0.7, **params)
        assert torch.allclose(out, expected, atol=1e-6), method
    neg = composer.compose(_spec({"task": "mnli"}, method="negate"))
    assert torch.allclose(neg, origin_fn(L, 0) - mnli, atol=1e-6)
    summed = composer.compose(_spec(*terms[:1], {"task": "qnli"}, method="sum"))
    assert torch.allclose(summed, origin_fn(L, 0) + mnli + qnli, atol=1e-6)


def test_output_follows_origin_dtype(store):
    composer = Composer(store, lambda n, s: origin_fn(n, s).to(torch.bfloat16))
    out = composer.compose(_spec({"task": "mnli"}))
    assert out.dtype == torch.bfloat16


def test_accepts_a_plain_dict(store):
    composer = Composer(store, origin_fn)
    data = {"backbone_id": BB, "terms": [{"task": "mnli"}], "origin_seed": 0, "prompt_length": L}
    assert torch.equal(composer.compose(data), composer.compose(_spec({"task": "mnli"})))
    assert composer.cache_info().hits == 1


# ---- errors ------------------------------------------------------------------------------------------------------

def test_unknown_names_are_named_without_listing_the_store(store):
    composer = Composer(store, origin_fn)
    with pytest.raises(UnknownVector, match="'snli'") as err:
        composer.compose(_spec({"task": "snli"}))
    assert isinstance(err.value, LookupError)
    assert "mnli" not in str(err.value) and "qnli" not in str(err.value)
    some_id = store.list()[0].vector_id
    with pytest.raises(UnknownVector, match="mnli-s0-000000000000") as err:
        composer.compose(_spec({"vector_id": "mnli-s0-000000000000"}))
    assert some_id not in str(err.value)


def test_backbone_mismatch(store):
    other = _vec(5, "sst2", backbone="gemma")
    store.put(other)
    with pytest.raises(CompositionError, match="backbone mismatch") as err:
        Composer(store, origin_fn).compose(_spec({"vector_id": other.vector_id}))
    assert "gemma" in str(err.value) and BB in str(err.value)
    with pytest.raises(UnknownVector, match="no task vectors for task 'mnli' on backbone 'gemma'"):
        Composer(store, origin_fn).compose(_spec({"task": "mnli"}, backbone_id="gemma"))


def test_shape_mismatches(store):
    store.put(_vec(7, "long", length=L + 1))
    composer = Composer(store, origin_fn)
    with pytest.raises(CompositionError, match=r"prompt_length \[6\]"):
        composer.compose(_spec({"task": "long"}))
    long_id = store.list(task="long")[0].vector_id
    with pytest.raises(CompositionError, match="prompt_length 6"):
        composer.compose(_spec({"vector_id": long_id}))
    wide = Composer(store, lambda n, s: torch.zeros(n, D + 1))
    with pytest.raises(CompositionError, match="hidden size"):
        wide.compose(_spec({"task": "mnli"}))
    wrong_len = Composer(store, lambda n, s: torch.zeros(n + 1, D))
    with pytest.raises(CompositionError, match="not \\[L, d\\]"):
        wrong_len.compose(_spec({"task": "mnli"}))
    store.put(_vec(8, "wide", hidden=D + 1))
    with pytest.raises(CompositionError, match="hidden sizes"):
        composer.compose(_spec({"task": "mnli"}, {"task": "wide"}))


def test_bad_composer_arguments(store):
    with pytest.raises(ValueError):
        Composer(store, origin_fn, max_entries=-1)
    with pytest.raises(ValueError):
        Composer(store, origin_fn, watch_interval_s=-1.0)


# ---- cache -------------------------------------------------------------------------------------------------------

def test_cache_hits_and_returns_fresh_tensors(store):
    composer = Composer(store, origin_fn)
    spec = _spec({"task": "mnli"}, {"task": "qnli", "weight": 0.5})
    first = composer.compose(spec)
    expected = first.clone()
    first.add_(100.0)  # callers may mutate what they get
    again = composer.compose(_spec({"task": "qnli", "weight": 0.5}, {"task": "mnli"}))  # same canonical spec
    assert torch.equal(again, expected)
    info = composer.cache_info()
    assert (info.hits, info.misses, info.entries) == (1, 1, 1)
    assert info.bytes == L * D * 4


def test_lru_eviction_by_entries(store):
    composer = Composer(store, origin_fn, max_entries=2)
    a, b, c = (_spec({"task": "mnli"}, origin_seed=s) for s in range(3))
    composer.compose(a)
    composer.compose(b)
    composer.compose(a)  # a is now most recent: b goes first
    composer.compose(c)
    info = composer.cache_info()
    assert (info.entries, info.evictions, info.hits, info.misses) == (2, 1, 1, 3)
    composer.compose(a)
    assert composer.cache_info().hits == 2
    composer.compose(b)
    assert composer.cache_info().misses == 4


def test_lru_eviction_by_bytes(store):
    entry = L * D * 4
    composer = Composer(store, origin_fn, max_bytes=2 * entry + 1)
    for s in range(4):
        composer.compose(_spec({"task": "mnli"}, origin_seed=s))
    info = composer.cache_info()
    assert (info.entries, info.bytes, info.evictions) == (2, 2 * entry, 2)
    tiny = Composer(store, origin_fn, max_bytes=entry - 1)  # an entry bigger than the budget is not cached
    tiny.compose(_spec({"task": "mnli"}))
    assert tiny.cache_info().entries == 0
    off = Composer(store, origin_fn, max_entries=0)
    off.compose(_spec({"task": "mnli"}))
    off.compose(_spec({"task": "mnli"}))
    assert (off.cache_info().entries, off.cache_info().hits) == (0, 0)


def test_invalidate_and_store_watching(store):
    spec = _spec({"task": "mnli"})
    plain = Composer(store, origin_fn)
    watching = Composer(store, origin_fn, watch_interval_s=0.0)
    before = plain.compose(spec)
    assert torch.equal(watching.compose(spec), before)
    store.put(_vec(3, "mnli"))  # the task mean changes
    fresh = origin_fn(L, 0) + torch.stack(_tau(store, "mnli")).mean(0)
    assert torch.equal(plain.compose(spec), before)  # stale until told
    assert torch.allclose(watching.compose(spec), fresh, atol=1e-6)
    plain.invalidate()
    assert plain.cache_info().entries == 0
    assert torch.allclose(plain.compose(spec), fresh, atol=1e-6)
    slow = Composer(store, origin_fn, watch_interval_s=3600.0)
    slow.compose(spec)
    store.put(_vec(4, "mnli"))
    slow.compose(spec)
    assert slow.cache_info().hits == 1  # not re-checked within the interval


def test_concurrent_compose_from_threads(store):
    composer = Composer(store, origin_fn, max_entries=3)
    specs = [_spec({"task": "mnli"}, {"task": "qnli", "weight": w}) for w in (0.1, 0.2, 0.3, 0.4, 0.5)]
    expected = [Composer(store, origin_fn).compose(s) for s in specs]
    errors = []

    def work(k):
        try:
            for i in range(40):
                j = (i + k) % len(specs)
                assert torch.equal(composer.compose(specs[j]), expected[j])
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    info = composer.cache_info()
    assert info.entries <= 3 and info.hits + info.misses == 160


# ---- named compositions ------------------------------------------------------------------------------------------

def test_named_compositions(store):
    composer = Composer(store, origin_fn)
    spec = _spec({"task": "mnli", "weight": 0.6}, {"task": "qnli", "weight": 0.4}, method="ties",
                 params={"density": 0.5})
    composer.save_named("snli-from-mnli-qnli", spec)
    assert store.list_compositions(BB) == ["snli-from-mnli-qnli"]
    assert composer.named(BB, "snli-from-mnli-qnli") == spec
    assert torch.equal(composer.compose_named(BB, "snli-from-mnli-qnli"), composer.compose(spec))
    with pytest.raises(NotFound, match="'missing'") as err:
        composer.named(BB, "missing")
    assert "snli-from-mnli-qnli" not in str(err.value)  # an unknown name never lists what is stored
    store.put_composition(BB, "broken", {"terms": []})
    with pytest.raises(CompositionError, match="not a valid spec"):
        composer.named(BB, "broken")
    store.put_composition("gemma", "misfiled", spec.model_dump(mode="json"))
    with pytest.raises(CompositionError, match="gemma"):
        composer.named("gemma", "misfiled")


# ---- the task-term rule ------------------------------------------------------------------------------------------

def _tagged(seed: int, task: str, source: str | None, **kw) -> TaskPromptVector:
    return TaskPromptVector.create(_randn(L, D, seed=seed + 1000 * sum(map(ord, source or ""))), task=task, backbone_id=BB,
                                   origin_seed=kw.get("origin_seed", seed), source=source)


def test_a_task_term_is_the_seed_mean_of_one_job_s_vectors(tmp_path):
    store = VectorStore(tmp_path)
    a = [_tagged(s, "mnli", "tpv sweep a") for s in (0, 1, 2)]
    b = [_tagged(s, "mnli", "tpv sweep b") for s in (0, 1)]
    for v in a + b:
        store.put(v)
    composer = Composer(store, origin_fn)
    # two trainings of (mnli, seed 0): averaging them silently would mix recipes, so the term must say which
    with pytest.raises(CompositionError, match="several vectors for one origin seed"):
        composer.compose(_spec({"task": "mnli"}))
    out = composer.compose(_spec({"task": "mnli", "source": "tpv sweep a"}))
    expected = origin_fn(L, 0) + torch.stack([v.tensor for v in a]).mean(0)
    assert torch.allclose(out, expected, atol=1e-6)
    out = composer.compose(_spec({"task": "mnli", "source": "tpv sweep b", "seeds": [1]}))
    assert torch.allclose(out, origin_fn(L, 0) + b[1].tensor, atol=1e-6)
    metas = task_vectors(store, BB, "mnli", L, seeds=[2, 0], source="tpv sweep a")
    assert [m.origin_seed for m in metas] == [0, 2] and [m.vector_id for m in metas] == [a[0].vector_id, a[2].vector_id]
    with pytest.raises(UnknownVector, match="seeds \\[7\\]"):
        task_vectors(store, BB, "mnli", L, seeds=[7], source="tpv sweep a")


def test_a_task_term_never_reads_stored_compositions(tmp_path):
    store = VectorStore(tmp_path)
    task_vec = _tagged(0, "mnli", None)
    store.put(task_vec)
    composition = TaskPromptVector.create(_randn(L, D, seed=99), task="mnli", backbone_id=BB, origin_seed=1,
                                          kind="composition")
    store.put(composition)
    out = Composer(store, origin_fn).compose(_spec({"task": "mnli"}))
    assert torch.allclose(out, origin_fn(L, 0) + task_vec.tensor, atol=1e-6)
    # ... but a stored composition can still be named by its id
    out = Composer(store, origin_fn).compose(_spec({"vector_id": composition.vector_id}))
    assert torch.allclose(out, origin_fn(L, 0) + composition.tensor, atol=1e-6)


def test_the_prompt_length_is_the_one_the_named_vectors_share(tmp_path):
    store = VectorStore(tmp_path)
    store.put(_vec(0, "mnli"))
    store.put(_vec(1, "long", length=L + 2))
    assert prompt_length_of(store, BB, CompositionBody(terms=[{"task": "mnli"}])) == L
    assert prompt_length_of(store, BB, CompositionBody(terms=[{"task": "long"}])) == L + 2
    with pytest.raises(CompositionError, match="different prompt lengths"):
        prompt_length_of(store, BB, CompositionBody(terms=[{"task": "mnli"}, {"task": "long"}]))
    body = CompositionBody(terms=[{"task": "mnli", "weight": 0.5}], coefficient=2.0)
    spec = body.applied(BB, 3, L)
    assert (spec.origin_seed, spec.prompt_length, spec.terms, spec.coefficient) == (3, L, body.terms, 2.0)
