"""Backbones by hub id, resolved from an HF cache laid out as huggingface_hub writes it; the paper's presets.

The cache is built here the way a download leaves it (``models--owner--name/blobs/<sha256>``, ``snapshots/<commit>/``
holding links to the blobs, ``refs/main`` naming the commit) from tiny random models, and every lookup runs through
`tpv.bundled.resolve_model_path` as users' runs do, under ``HF_HUB_OFFLINE=1``: nothing can reach a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import write_sentiment_task
from tiny_models import build_tiny_causal, build_tiny_t5
from tpv.backbone import Backbone, BackboneConfig, backbone_id_for
from tpv.bundled import BackboneNotFound, resolve_model_path
from tpv.errors import EXIT_CODES, NotFoundError, Unavailable
from tpv.hub_models import ALLOW_DOWNLOAD_ENV, HubModelNotFound, HubModelUnavailable
from tpv.train import PRESETS, TrainConfig, _schedule, train, warmup_steps_for

LLAMA_ID, T5_ID, BARE_ID = "tiny-org/Llama-Tiny-Instruct", "tiny-org/t5-tiny", "t5-tiny-bare"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, model_folder: Path, commit: str = COMMIT) -> Path:
    """`model_folder`'s files as the hub cache holds a downloaded repository; returns its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(model_folder.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models as plain folders (the reference) and, the same files, in a constructed HF cache."""
    root = tmp_path_factory.mktemp("hub-models")
    folders = {LLAMA_ID: build_tiny_causal(root / "llama", seed=3), T5_ID: build_tiny_t5(root / "t5", seed=4)}
    folders[BARE_ID] = folders[T5_ID]
    cache = root / "hf-home" / "hub"
    for repo_id, folder in folders.items():
        cache_repo(cache, repo_id, folder)
    return {"cache": cache, **folders}


@pytest.fixture
def offline_cache(models, monkeypatch) -> Path:
    """HF_HOME pointing at the constructed cache (as a user's ~/.cache/huggingface is found), hub access off."""
    for name in ("HF_HUB_CACHE", ALLOW_DOWNLOAD_ENV, "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(models["cache"].parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return models["cache"]


@pytest.mark.parametrize("repo_id", [LLAMA_ID, T5_ID, BARE_ID])
def test_a_hub_id_resolves_to_its_snapshot_in_the_cache(offline_cache, models, repo_id):
    path = resolve_model_path(repo_id)
    assert path == offline_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
    assert (path / "config.json").read_bytes() == (models[repo_id] / "config.json").read_bytes()


@pytest.mark.parametrize("repo_id", [LLAMA_ID, T5_ID])
def test_a_backbone_loaded_by_hub_id_is_the_cached_model(offline_cache, models, repo_id):
    """Same scores as the model's own folder (a different random model would differ), and a store id that keeps
    the owner: `tiny-org--...`, where the folder gives its base name."""
    by_id = Backbone.load(BackboneConfig(model=repo_id, device="cpu", dtype="float32"))
    by_folder = Backbone.load(BackboneConfig(model=str(models[repo_id]), device="cpu", dtype="float32"))
    other = Backbone.load(BackboneConfig(model=str(build_tiny_causal(offline_cache.parent / "other", seed=9)
                                                  if repo_id == LLAMA_ID else
                                                  build_tiny_t5(offline_cache.parent / "other-t5", seed=9)),
                                         device="cpu", dtype="float32"))
    assert by_id.is_seq2seq == (repo_id == T5_ID)
    prompt = torch.randn(4, by_id.hidden_size, generator=torch.Generator().manual_seed(0))
    sources, labels = ["the movie was great", "the film was terrible"], ["positive", "negative"]
    scores = by_id.score_labels(prompt, sources, labels)
    assert torch.equal(scores, by_folder.score_labels(prompt, sources, labels))
    assert not torch.allclose(scores, other.score_labels(prompt, sources, labels))
    assert by_id.backbone_id == repo_id.lower().replace("/", "--")
    assert by_folder.backbone_id == models[repo_id].name


def test_backbone_ids():
    assert backbone_id_for("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama--llama-3.1-8b-instruct"
    assert backbone_id_for("deepseek-ai/deepseek-llm-7b-chat") == "deepseek-ai--deepseek-llm-7b-chat"
    assert backbone_id_for("t5-base") == "t5-base"
    # unchanged: bundled names, and folders (by their base name) whatever their depth
    assert backbone_id_for("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert backbone_id_for("/models/Tiny-Llama/") == "tiny-llama"
    assert backbone_id_for("./meta-llama/Llama-3.1-8B") == "llama-3.1-8b"


def test_an_existing_folder_wins_over_a_hub_id(offline_cache, models, tmp_path, monkeypatch):
    """`owner/name` that is a folder here is that folder (no cache lookup), with its folder id."""
    local = tmp_path / "tiny-org" / "Llama-Tiny-Instruct"
    local.parent.mkdir()
    local.symlink_to(models[LLAMA_ID], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(LLAMA_ID) == Path(LLAMA_ID)
    assert backbone_id_for(LLAMA_ID) == "llama-tiny-instruct"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and exc.__cause__ is None and exc.__suppress_context__
    return text


def test_a_missing_hub_id_offline_is_one_line_naming_both_ways(offline_cache, monkeypatch):
    with pytest.raises(HubModelUnavailable) as caught:
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")
    text = one_line(caught.value)
    assert isinstance(caught.value, Unavailable) and isinstance(caught.value, BackboneNotFound)
    assert "'meta-llama/Llama-3.1-8B-Instruct'" in text and str(offline_cache) in text
    assert "local from_pretrained folder" in text and f"{ALLOW_DOWNLOAD_ENV}=1" in text
    assert "HF_HUB_OFFLINE=1 is set" in text
    # allowing downloads changes nothing while HF_HUB_OFFLINE=1: still the cache only, still this error
    monkeypatch.setenv(ALLOW_DOWNLOAD_ENV, "1")
    with pytest.raises(HubModelUnavailable, match="HF_HUB_OFFLINE=1 is set"):
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")


def test_without_the_switch_nothing_is_downloaded_even_online(offline_cache, monkeypatch):
    """HF_HUB_OFFLINE unset and no TPV_ALLOW_DOWNLOAD: the cache is all that is read (local_files_only), the error
    says downloads are off and how to turn them on. Cached models still resolve."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubModelUnavailable) as caught:
        resolve_model_path("deepseek-ai/deepseek-llm-7b-chat")
    assert f"downloads are off (set {ALLOW_DOWNLOAD_ENV}=1 to allow one)" in one_line(caught.value)
    assert resolve_model_path(T5_ID).parent.name == "snapshots"


def test_a_cached_repository_without_a_model_is_not_found(offline_cache, tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    cache_repo(offline_cache, "tiny-org/not-a-model", tmp_path)
    with pytest.raises(HubModelNotFound, match="has no config.json") as caught:
        resolve_model_path("tiny-org/not-a-model")
    assert isinstance(caught.value, NotFoundError)


def test_strings_that_are_neither_keep_the_old_error(offline_cache, tmp_path):
    with pytest.raises(BackboneNotFound, match="neither a bundled model") as caught:
        resolve_model_path("a/b/c")  # three parts: not a hub id, and no such folder
    assert not isinstance(caught.value, HubModelUnavailable)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneNotFound, match="neither a bundled model"):
        resolve_model_path(str(empty))


# ---- the CLI, as users run it ---------------------------------------------------------------------------------------
def tpv(*args: str, home: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", ALLOW_DOWNLOAD_ENV)}
    environ |= {"TPV_HOME": str(home), "TPV_STORE": str(home / "store"), "HF_HOME": str(cache.parent),
                "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "tpv.cli", *args], capture_output=True, text=True, env=environ,
                          timeout=300)


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, models):
    home = tmp_path_factory.mktemp("hub-cli-home")
    write_sentiment_task(home, "hub_sentiment")
    added = tpv("tasks", "add", str(home / "hub_sentiment.yaml"), home=home, cache=models["cache"])
    assert added.returncode == 0, added.stderr
    return home


@pytest.mark.parametrize("repo_id", [LLAMA_ID, T5_ID])
def test_tpv_train_by_hub_id_end_to_end(cli_home, models, repo_id):
    out = tpv("train", "--task", "hub_sentiment", "--backbone", repo_id, "--steps", "2", "--prompt-length", "4",
              home=cli_home, cache=models["cache"])
    assert out.returncode == 0, out.stderr
    vector_id = json.loads(out.stdout)["vector_id"]
    shown = json.loads(tpv("vectors", "show", vector_id, home=cli_home, cache=models["cache"]).stdout)
    assert shown["backbone_id"] == repo_id.lower().replace("/", "--")
    assert shown["train_config"]["backbone"]["model"] == repo_id
    assert shown["prompt_length"] == 4


def test_tpv_train_with_a_missing_hub_id_is_one_line_and_its_exit_code(cli_home, models):
    out = tpv("train", "--task", "hub_sentiment", "--backbone", "meta-llama/Llama-3.1-8B-Instruct", "--steps", "1",
              home=cli_home, cache=models["cache"])
    assert out.returncode == EXIT_CODES[Unavailable], (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "'meta-llama/Llama-3.1-8B-Instruct'" in out.stderr and str(models["cache"]) in out.stderr


# ---- presets --------------------------------------------------------------------------------------------------------
def test_the_paper_presets():
    t5 = TrainConfig.preset("t5_paper", "sst2")
    assert (t5.prompt_length, t5.lr, t5.weight_decay, t5.warmup_steps, t5.warmup_ratio, t5.schedule, t5.batch_size,
            t5.epochs) == (50, 0.3, 1e-5, 500, None, "linear", 32, 10)
    llm = TrainConfig.preset("llm_paper", "sst2")
    assert (llm.prompt_length, llm.lr, llm.warmup_ratio, llm.schedule, llm.batch_size, llm.backbone.dtype) == (
        100, 0.3, 0.03, "cosine", 4, "bfloat16")
    # "paper" stays the TrainConfig defaults (the T5 recipe, its length and schedule following the backbone)
    assert TrainConfig.preset("paper", "sst2") == TrainConfig(task="sst2")
    assert {"t5_paper", "llm_paper", "paper", "causal", "causal_cpu"} <= set(PRESETS)
    # an override on the backbone block keeps the preset's dtype
    mixed = TrainConfig.preset("llm_paper", "sst2", backbone={"model": LLAMA_ID})
    assert (mixed.backbone.model, mixed.backbone.dtype) == (LLAMA_ID, "bfloat16")


def test_warmup_ratio_counts_steps_of_the_run(models):
    config = TrainConfig.preset("llm_paper", "sst2", max_steps=1000)
    assert warmup_steps_for(config, 1000) == 30 and warmup_steps_for(config, 101) == 4  # ceil, as transformers
    causal = Backbone.load(BackboneConfig(model=str(models[LLAMA_ID]), device="cpu", dtype="float32"))
    factor = _schedule(config, causal, 1000)
    assert factor(0) == pytest.approx(1 / 31) and factor(29) == pytest.approx(30 / 31)
    assert factor(30) == 1.0 and factor(515) == pytest.approx(0.5) and factor(999) < 1e-4
    with pytest.raises(ValueError, match="both set"):
        TrainConfig.preset("llm_paper", "sst2", warmup_steps=100)
    assert warmup_steps_for(TrainConfig.preset("llm_paper", "sst2", warmup_steps=100, warmup_ratio=None), 1000) == 100
    with pytest.raises(ValueError, match="less than 1"):
        TrainConfig(task="sst2", warmup_ratio=1.0)


def test_gradient_checkpointing_recomputes_and_trains_the_same_prompt(models, monkeypatch):
    """With the flag every layer runs again in each backward pass: while layers are recomputed (training passes)
    each MLP runs twice per step, forward and replayed (module hooks do not fire on the replay: the class's forward
    is counted). The tuned prompt is the one trained without it."""
    from transformers.models.llama import modeling_llama

    task = write_sentiment_task(models["cache"].parent, "hub_ckpt_sentiment")
    forward, results, replayed = modeling_llama.LlamaMLP.forward, {}, {}
    for flag in (False, True):
        backbone = Backbone.load(BackboneConfig(model=str(models[LLAMA_ID]), device="cpu", dtype="float32",
                                                gradient_checkpointing=flag))
        count = [0]

        def counted(self, x, _backbone=backbone, _count=count):
            _count[0] += _backbone.recomputing
            return forward(self, x)

        monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
        config = TrainConfig(task=task, backbone=backbone.config, prompt_length=4, max_steps=3, eval_every=3,
                             eval_examples=4, batch_size=4, warmup_steps=0, lr=0.1, progress=False)
        results[flag] = train(config, backbone)
        replayed[flag] = count[0]
    layers = len(backbone.model.model.layers)
    assert replayed == {False: 0, True: 3 * layers * 2}  # 3 steps of one pass: each layer run, then replayed
    assert not torch.equal(results[False].tuned, results[False].origin)
    torch.testing.assert_close(results[True].tuned, results[False].tuned, rtol=1e-5, atol=1e-6)
