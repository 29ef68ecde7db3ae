"""The ingress's pure parts without Ray: rendered-length bound, API keys and scopes, the error table, redaction."""

from __future__ import annotations

import pytest

from serve.auth import ApiKey, AuthSettings, Forbidden, Keyring, Unauthorized, digest
from serve.errors import BodyTimeout, BodyTooLarge, ModelUnavailable, RequestTimeout, redact, status_of
from serve.inputs import InputError, render, rendered_length
from tpv.compose import CompositionError
from tpv.errors import ConflictError, CorruptData, Unavailable
from tpv.store import CorruptVector, NotFound, UnknownVector
from tpv.tasks import get_task
from tpv.tasks.registry import UnknownTaskError


@pytest.mark.parametrize("template,row", [
    ("{text}", {"text": "abc"}),
    ("review: {text} sentiment:", {"text": "a b c d"}),
    ("{premise} / {hypothesis} / {premise}", {"premise": "p" * 7, "hypothesis": "h"}),
    ("{{literal}} {text}{text}{text}", {"text": "xy"}),
])
def test_rendered_length_is_the_length_of_the_filled_template(template, row):
    assert rendered_length(template, row) == len(template.format(**row))


def test_a_template_repeating_its_field_is_refused_on_the_filled_length():
    with pytest.raises(InputError, match="template filled; the limit is 4000"):
        render(["a" * 4000], "{text}" * 1000, None, max_chars=4000)  # 4 MB if it were built
    assert render(["a" * 10], "{text}" * 3, None, max_chars=30) == ["a" * 30]


def test_task_templates_cut_fields_like_training_and_pairs_map_in_order():
    nli = get_task("presuppositions_nli")
    row = {"premise": "it rained", "hypothesis": "it was dry"}
    assert render([["it rained", "it was dry"], row], nli.template, nli, 4000) == [nli.render(row)] * 2
    with pytest.raises(InputError, match="needs 2"):
        render([["only one"]], nli.template, nli, 4000)


def test_keys_are_checked_by_digest_and_scoped():
    assert Keyring([]).check(None).key is None  # no keys: open
    ring = Keyring([ApiKey(sha256=digest("a-key")), ApiKey(sha256=digest("b-key"), tasks=["sst2"],
                                                             compositions=["mix"])])
    for token in (None, "", "a-key ", "c-key"):
        with pytest.raises(Unauthorized):
            ring.check(token)
    assert ring.check("a-key").key.sha256 == digest("a-key")
    ring.check("a-key").allow({"trec"}, {"other"}, vector_ids=True)  # unscoped
    scoped = ring.check("b-key")
    scoped.allow({"sst2"}, {"mix"}, vector_ids=False)
    for args in (({"trec"}, set(), False), (set(), {"other"}, False), ({"sst2"}, set(), True)):
        with pytest.raises(Forbidden):
            scoped.allow(*args)
    assert scoped.visible("sst2") and not scoped.visible("trec")


def test_env_keys_are_added_hashed(monkeypatch):
    monkeypatch.setenv("TPV_API_KEYS", "k1, k2")
    keys = AuthSettings(keys=[ApiKey(sha256=digest("k0"))]).resolved()
    assert [k.sha256 for k in keys] == [digest("k0"), digest("k1"), digest("k2")]


@pytest.mark.parametrize("exc,status", [
    (CompositionError("x"), 422), (UnknownVector("x"), 404), (UnknownTaskError("x"), 404), (NotFound("x"), 404),
    (CorruptVector("x"), 500), (CorruptData("x"), 500), (ConflictError("x"), 409), (Unavailable("x"), 503),
    (ModelUnavailable("x"), 503), (RequestTimeout("x"), 504), (BodyTooLarge("x"), 413), (BodyTimeout("x"), 408),
    (Unauthorized("x"), 401), (Forbidden("x"), 403), (RuntimeError("x"), 500),
])
def test_one_table_maps_errors_by_type(exc, status):
    assert status_of(exc)[0] == status


def test_paths_are_redacted():
    text = "unreadable vector metadata at /tmp/store-1/tiny/vectors/t/v1: bad; model /root/.cache/tpv/models/x"
    out = redact(text)
    assert "/tmp" not in out and "/root" not in out and out.startswith("unreadable vector metadata at <path>")
