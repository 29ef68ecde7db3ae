"""The OpenAI-compatible routes through the official `openai` client, against the live app on the session's local
Ray: tiny real model (with a chat template), real store, API keys on.

Expected texts come from transformers' own greedy `generate` over the offline-composed prompt (nothing cached).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from test_generate import reference_tokens
from test_serve_http import deploy
from tiny_models import build_sharp_causal

from serve.auth import digest
from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import Composer, CompositionSpec
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.vectors import TaskPromptVector

openai = pytest.importorskip("openai")

L = 6
APP = "tpv-openai-test"
KEY, TREC_KEY = "sk-test-full", "sk-test-trec-only"
PROMPTS = ["the movie was great and the acting was wonderful", "what is the capital of france?"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first message must not be the assistant') }}"
    "{% endif %}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
LIMITS = {"max_inputs": 8, "max_input_chars": 1000, "max_new_tokens": 16, "max_terms": 4, "max_abs_weight": 10.0,
          "max_body_bytes": 200_000}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny causal model with a chat template (the tiny tokenizer has none of its own)."""
    from transformers import AutoTokenizer

    path = build_sharp_causal(tmp_path_factory.mktemp("models") / "tiny-chat")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backbone(model_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(model_path), device="cpu"))


def _vector(task: str, bb: Backbone, seed: int, vector_id: str | None = None, backbone_id: str | None = None):
    g = torch.Generator().manual_seed(seed)
    return TaskPromptVector.create(torch.randn(L, bb.hidden_size, generator=g) * 0.5, task=task, origin_seed=0,
                                   backbone_id=backbone_id or bb.backbone_id, vector_id=vector_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("openai-store"))
    store.put(_vector("rotten_tomatoes", backbone, 1))
    store.put(_vector("trec", backbone, 2, vector_id="trec-v1"))
    store.put(_vector("alien", backbone, 3, backbone_id="other-backbone"))
    bb = backbone.backbone_id
    store.put_composition(bb, "mix", {"backbone_id": bb, "origin_seed": 2, "prompt_length": L,
                                      "terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1"}]})
    return store


@pytest.fixture(scope="module")
def url(ray_session, model_path, store):
    from ray import serve

    from serve.app import build

    keys = [{"sha256": digest(KEY), "name": "full"},
            {"sha256": digest(TREC_KEY), "name": "trec", "tasks": ["trec"], "compositions": []}]
    app = build({"user_config": {"store_uri": store.uri, "backbone": str(model_path), "device": "cpu",
                                 "max_batch_size": 16, "batch_wait_timeout_s": 0.1, "reload_interval_s": 0.5,
                                 "torch_threads": 1, "max_input_tokens": 64, "max_prompt_length": 64},
                 "ray_actor_options": {"num_cpus": 1}, "num_replicas": 1},
                {"user_config": {"limits": LIMITS, "request_timeout_s": 30.0, "auth": {"keys": keys}},
                 "ray_actor_options": {"num_cpus": 0}})
    yield deploy(app, APP, "/oai")
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(backbone: Backbone, store: VectorStore, spec: dict, source: str, max_new: int) -> tuple[str, int]:
    """The uncached reference's text and token count (transformers' greedy generate over [prompt][source])."""
    prompt = Composer(store, lambda n, s: make_origin(backbone, n, s)).compose(CompositionSpec.model_validate(spec))
    tokens = reference_tokens(backbone, prompt, source, max_new)
    return backbone.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def spec_of(backbone: Backbone, terms: list[dict], origin_seed: int = 0) -> dict:
    return {"backbone_id": backbone.backbone_id, "terms": terms, "origin_seed": origin_seed, "prompt_length": L}


def test_models_lists_stored_compositions_and_tasks_per_key(client, url):
    models = {m.id: m.owned_by for m in client.models.list()}
    assert models == {"mix": "composition", "rotten_tomatoes": "task", "trec": "task"}  # not another backbone's
    scoped = openai.OpenAI(base_url=f"{url}/v1", api_key=TREC_KEY, max_retries=0)
    assert [m.id for m in scoped.models.list()] == ["trec"]


def test_completions_greedy_equal_the_uncached_reference_with_usage(client, backbone, store):
    out = client.completions.create(model="mix", prompt=PROMPTS, max_tokens=8, temperature=0)
    spec = store.get_composition(backbone.backbone_id, "mix")
    want = [expected(backbone, store, spec, p, 8) for p in PROMPTS]
    assert [c.text for c in out.choices] == [w[0] for w in want]
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.finish_reason for c in out.choices] == ["length" if w[1] == 8 else "stop" for w in want]
    prompt_tokens = sum(len(backbone.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == sum(w[1] for w in want)
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == "mix"


def test_model_names_a_task_and_the_extra_body_an_inline_composition(client, backbone, store):
    by_task = client.completions.create(model="trec", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert by_task.choices[0].text == expected(backbone, store, spec_of(backbone, [{"task": "trec"}]), PROMPTS[1], 6)[0]
    terms = [{"vector_id": "trec-v1", "weight": -0.7}, {"task": "rotten_tomatoes", "weight": 1.2}]
    inline = client.completions.create(model="anything", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                       extra_body={"composition": {"terms": terms, "origin_seed": 3}})
    assert inline.model == "anything"
    assert inline.choices[0].text == expected(backbone, store, spec_of(backbone, terms, 3), PROMPTS[1], 6)[0]
    assert inline.choices[0].text != by_task.choices[0].text


def test_chat_completions_go_through_the_chat_template(client, backbone, store):
    messages = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "is the movie great?"}]
    out = client.chat.completions.create(model="rotten_tomatoes", messages=messages, max_tokens=7, temperature=0)
    source = backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert source.endswith("<assistant>")
    text, n = expected(backbone, store, spec_of(backbone, [{"task": "rotten_tomatoes"}]), source, 7)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(backbone.tokenizer(source)["input_ids"]) and out.usage.completion_tokens == n
    assert out.object == "chat.completion"


def test_streaming_sends_the_same_text_token_by_token_then_done(client, url):
    whole = client.completions.create(model="mix", prompt=PROMPTS, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="mix", prompt=PROMPTS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert len([c for c in chunks if c.choices]) >= 6  # one event per decoding step, not one at the end
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == sorted(c.finish_reason for c in whole.choices)

    messages = [{"role": "user", "content": "what is the capital of france?"}]
    chat = client.chat.completions.create(model="trec", messages=messages, max_tokens=10, temperature=0)
    parts = list(client.chat.completions.create(model="trec", messages=messages, max_tokens=10, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    raw = requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=30,
                        json={"model": "mix", "prompt": PROMPTS[0], "max_tokens": 4, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_seeded_sampling_top_p_and_stop(client):
    a = client.completions.create(model="mix", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, n=3, seed=7)
    b = client.completions.create(model="mix", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, n=3, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert len({c.text for c in a.choices}) > 1  # the choices differ
    greedy = client.completions.create(model="mix", prompt=PROMPTS[0], max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    narrow = client.completions.create(model="mix", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=1e-6)
    assert narrow.choices[0].text == greedy.choices[0].text  # only the most likely token survives top_p
    text = greedy.choices[0].text
    assert len(text) >= 6, text
    stop = text[3:6]
    stopped = client.completions.create(model="mix", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_of_different_compositions_share_one_decoding_loop(client, url, backbone, store):
    bodies = [{"terms": [{"task": "rotten_tomatoes", "weight": 0.2 * (i + 1)}, {"vector_id": "trec-v1"}],
               "origin_seed": i} for i in range(6)]
    for _ in range(3):
        barrier = threading.Barrier(len(bodies))

        def send(composition, barrier=barrier):
            barrier.wait()
            return client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                             extra_body={"composition": composition}).choices[0].text

        with ThreadPoolExecutor(len(bodies)) as pool:
            texts = list(pool.map(send, bodies))
        stats = requests.get(f"{url}/v1/health", timeout=10).json()["batching"]
        if stats["max_compositions_in_batch"] >= 3:
            break
    assert stats["max_compositions_in_batch"] >= 3, stats
    for composition, text in zip(bodies, texts):
        assert text == expected(backbone, store, spec_of(backbone, composition["terms"], composition["origin_seed"]),
                                PROMPTS[0], 5)[0]


OK = {"model": "mix", "prompt": "the movie was great", "max_tokens": 4}
CHAT = {"model": "mix", "messages": [{"role": "user", "content": "hello"}]}
BAD = [
    ("unknown model", "/v1/completions", {**OK, "model": "sst9"}, 404, "sst9", None),
    ("path-like model", "/v1/completions", {**OK, "model": "../etc"}, 422, "invalid name", "model"),
    ("temperature over 2", "/v1/completions", {**OK, "temperature": 3}, 422, "2", "temperature"),
    ("top_p zero", "/v1/completions", {**OK, "top_p": 0}, 422, "greater than 0", "top_p"),
    ("max_tokens over the limit", "/v1/completions", {**OK, "max_tokens": 17}, 422, "limit 16", "max_tokens"),
    ("prompts x n over max_inputs", "/v1/completions", {**OK, "prompt": ["a", "b", "c"], "n": 3}, 422, "limit is 8",
     "prompt"),
    ("prompt too long (chars)", "/v1/completions", {**OK, "prompt": "a" * 1001}, 422, "limit is 1000", "prompt"),
    ("prompt too long (tokens)", "/v1/completions", {**OK, "prompt": "the movie was great " * 30}, 422, "tokens",
     "prompt"),
    ("token-id prompt", "/v1/completions", {**OK, "prompt": [1, 2, 3]}, 422, "token-id", "prompt"),
    ("empty prompt", "/v1/completions", {**OK, "prompt": "  "}, 422, "empty", "prompt"),
    ("unsupported field", "/v1/completions", {**OK, "tools": []}, 422, "extra", "tools"),
    ("penalty", "/v1/completions", {**OK, "presence_penalty": 0.5}, 422, "not supported", "presence_penalty"),
    ("five stop strings", "/v1/completions", {**OK, "stop": list("abcde")}, 422, "at most 4", "stop"),
    ("unknown vector inline", "/v1/completions", {**OK, "composition": {"terms": [{"vector_id": "nope"}]}}, 404,
     "nope", None),
    ("weight over the limit", "/v1/completions", {**OK, "composition": {"terms": [{"task": "trec", "weight": 50}]}},
     422, "outside", None),
    ("no messages", "/v1/chat/completions", {**CHAT, "messages": []}, 422, "at least 1", "messages"),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 422, "role",
     "messages"),
    ("template refuses", "/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "x"}]}, 422,
     "must not be the assistant", None),
    ("both token bounds", "/v1/chat/completions", {**CHAT, "max_tokens": 2, "max_completion_tokens": 2}, 422,
     "not both", None),
    ("stream, unknown model", "/v1/chat/completions", {**CHAT, "model": "sst9", "stream": True}, 404, "sst9", None),
    ("malformed json", "/v1/completions", "{not json", 400, "json", None),
    ("body too large", "/v1/completions", {**OK, "prompt": "a" * 300_000}, 413, "limit", None),
]


@pytest.mark.parametrize("case,path,body,status,words,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_the_openai_error_shape(url, store, case, path, body, status, words, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(f"{url}{path}", data=data, timeout=30,
                      headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert words.lower() in err["message"].lower(), err
    assert err["type"] == {404: "not_found_error", 413: "invalid_request_error"}.get(status, "invalid_request_error")
    assert err["param"] == param and err["code"]
    assert store.root not in r.text and "/tmp" not in r.text, r.text


def test_keys_apply_and_the_client_raises_typed_errors(client, url):
    nokey = requests.get(f"{url}/v1/models", timeout=10)
    assert nokey.status_code == 401 and nokey.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    scoped = openai.OpenAI(base_url=f"{url}/v1", api_key=TREC_KEY, max_retries=0)
    assert scoped.completions.create(model="trec", prompt="what?", max_tokens=2, temperature=0).choices
    for model, extra in (("mix", None), ("rotten_tomatoes", None),
                         ("x", {"composition": {"terms": [{"vector_id": "trec-v1"}]}})):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            scoped.completions.create(model=model, prompt="what?", max_tokens=2, extra_body=extra)
        assert caught.value.body["type"] == "permission_error"
    with pytest.raises(openai.NotFoundError, match="sst9"):
        client.chat.completions.create(model="sst9", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.UnprocessableEntityError, match="limit"):
        client.completions.create(model="mix", prompt="hi", max_tokens=17)
    wrong_method = requests.get(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
