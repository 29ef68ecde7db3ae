"""Backbones by hub id (`t5-base`, `meta-llama/Llama-3.1-8B-Instruct`), found in the user's HF cache.

`tpv.bundled.resolve_model_path` comes here for a string that is neither a bundled name nor a local model folder
but reads as a hub id (`name` or `owner/name`, huggingface_hub's own rule). The id resolves to its snapshot folder
in the HF cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) through
``huggingface_hub.snapshot_download(..., local_files_only=True)``: the cache layout transformers itself writes
(``models--owner--name/refs/main`` naming a commit, ``snapshots/<commit>/`` holding the files), and it reads the
disk only.

Nothing is downloaded unless the user allows it with ``TPV_ALLOW_DOWNLOAD=1``; ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) forbids it whatever ``TPV_ALLOW_DOWNLOAD`` says. A download fetches the config,
tokenizer and weight files only (safetensors when the repository has them, else the PyTorch ``.bin`` files; never
the ``original/`` checkpoints, GGUF, ONNX, TF or Flax copies). Not in the cache and not allowed: one line naming the
id, the cache looked in and both ways to provide the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpv.errors import NotFoundError, Unavailable

ALLOW_DOWNLOAD_ENV = "TPV_ALLOW_DOWNLOAD"
_TRUE = {"1", "true", "yes", "on"}
#: repository files a backbone never needs (duplicate checkpoints in other formats)
_IGNORED = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.ot",
            "*.tflite", "coreml/*", "flax_model*", "tf_model*", "rust_model*"]


class BackboneNotFound(Unavailable, FileNotFoundError):
    """Neither a bundled name, a local model folder, nor a hub model this machine has or may fetch."""


class HubModelUnavailable(BackboneNotFound):
    """A hub backbone is not in the HF cache and may not be downloaded (or the hub could not be reached)."""


class HubModelNotFound(NotFoundError, FileNotFoundError):
    """The hub has no such model repository, or holds no transformers model under it (no config.json)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def offline() -> bool:
    """Whether the user forbade every hub request (read now, not when huggingface_hub was imported)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def download_allowed() -> bool:
    return _env_true(ALLOW_DOWNLOAD_ENV) and not offline()


def hub_cache() -> Path:
    """The HF hub cache folder as huggingface_hub and transformers choose it, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def looks_like_hub_id(name: str) -> bool:
    """`name` or `owner/name` by huggingface_hub's rule, and not written as a path (`./x`, `/x`, `~/x`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _why_no_download() -> str:
    if offline():
        return "HF_HUB_OFFLINE=1 is set, so nothing is downloaded"
    return f"downloads are off (set {ALLOW_DOWNLOAD_ENV}=1 to allow one)"


def _weights_only_patterns(repo_id: str) -> list[str]:
    """Files to skip in a download: other formats, and the .bin copies when the repository has safetensors. When the
    listing fails, `snapshot_download` meets the same failure and reports it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id)
    except RepositoryNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - connection and HTTP failures alike: snapshot_download raises its own
        return _IGNORED
    return _IGNORED + (["*.bin"] if any(f.endswith(".safetensors") for f in files) else [])


def resolve_hub_model(repo_id: str) -> Path:
    """The snapshot folder of hub model `repo_id` in the HF cache, downloaded first only when allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache, allowed = hub_cache(), download_allowed()
    folder_way = "provide it as a local from_pretrained folder (--backbone /path/to/folder with a config.json)"
    provide = f"{folder_way} or let tpv download it into the cache once: {ALLOW_DOWNLOAD_ENV}=1 with HF_HUB_OFFLINE unset"
    try:
        if allowed:
            folder = snapshot_download(repo_id, cache_dir=cache, ignore_patterns=_weights_only_patterns(repo_id))
        else:
            folder = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except GatedRepoError:
        raise HubModelUnavailable(
            f"backbone {repo_id!r} is a gated hub model: accept its licence on the hub and log in (hf auth login, "
            f"or HF_TOKEN), or {folder_way}") from None
    except RepositoryNotFoundError:
        raise HubModelNotFound(f"backbone {repo_id!r}: the hub has no model repository of that id (nor is it a "
                               "bundled name or a local folder)") from None
    except LocalEntryNotFoundError as exc:
        where = (f"is not in the HF cache ({cache}) and {_why_no_download()}" if not allowed else
                 f"could not be downloaded into {cache} ({type(exc).__name__})")
        raise HubModelUnavailable(f"backbone {repo_id!r} is neither a bundled model nor a local folder, and {where}; "
                                  f"{provide}") from None
    except OSError as exc:  # a connection failure on the allowed download
        raise HubModelUnavailable(f"backbone {repo_id!r} could not be downloaded into {cache} "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                  f"{provide}") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise HubModelNotFound(f"backbone {repo_id!r}: its cached snapshot {path} has no config.json (not a "
                               "transformers model)")
    return path
