"""PEFT interop: a tuned prompt as a PEFT prompt-tuning adapter folder, and such a folder back as a vector.

The adapter is written by hand (its JSON config + `prompt_embeddings` in safetensors) so exporting needs no PEFT
install; `peft.AutoPeftModelForCausalLM.from_pretrained(folder)` loads it and its base model from the local folder
named in `base_model_name_or_path` (the tests compare its logits with tpv's). tpv prompts the encoder only on seq2seq
backbones, so it exports `num_transformer_submodules: 1` and refuses adapters that also prompt the decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from tpv.backbone import Backbone
from tpv.bundled import resolve_model_path
from tpv.errors import InvalidInput
from tpv.prompt import make_origin
from tpv.vectors import TaskPromptVector

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PeftAdapterError(InvalidInput):
    """A folder that is not a PEFT prompt-tuning adapter this backbone can use."""


def export_peft(prompt: Tensor, backbone: Backbone, folder: str | Path) -> Path:
    """Write `prompt` [L, d] as a PEFT prompt-tuning adapter for `backbone`.

    `base_model_name_or_path` is the absolute path of the backbone's local model folder (a bundled name is not
    something `from_pretrained` can find, and tpv never points at a hub).
    """
    if prompt.dim() != 2 or prompt.shape[1] != backbone.hidden_size:
        raise PeftAdapterError(f"a prompt for this backbone is [L, {backbone.hidden_size}], got {tuple(prompt.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_config = backbone.model.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task_type(backbone),
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": backbone.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None) or getattr(model_config, "num_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "num_layers", None),
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": str(resolve_model_path(backbone.config.model).resolve()),
        "inference_mode": True,
    }
    save_file({"prompt_embeddings": prompt.detach().float().cpu().contiguous()}, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _task_type(backbone: Backbone) -> str:
    return "SEQ_2_SEQ_LM" if backbone.is_seq2seq else "CAUSAL_LM"


def _submodules(config: dict) -> int:
    """How many prompts the adapter stacks (PEFT's default when unset: 2 for seq2seq, encoder then decoder)."""
    value = config.get("num_transformer_submodules")
    return int(value) if value is not None else (2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1)


def read_peft_prompt(folder: str | Path) -> Tensor:
    """The prompt [L, d] stored in a PEFT prompt-tuning adapter (safetensors only, never a pickle)."""
    return _read_adapter(folder)[1]


def _read_adapter(folder: str | Path) -> tuple[dict, Tensor]:
    """The adapter's config and prompt. Every stored row must belong to that one prompt: an adapter that also prompts
    a seq2seq decoder (`num_transformer_submodules` 2, PEFT's seq2seq default) is refused, since dropping its
    decoder rows would change what the adapter does."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise PeftAdapterError(f"{folder} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT's safetensors format)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PeftAdapterError(f"{folder} holds a {config.get('peft_type')!r} adapter, not PROMPT_TUNING")
    if _submodules(config) != 1:
        raise PeftAdapterError(
            f"{folder} also prompts the decoder (num_transformer_submodules={_submodules(config)}); tpv prompts the "
            "encoder only: train the adapter with num_transformer_submodules=1"
        )
    weights = load_file(weights_path)
    if "prompt_embeddings" not in weights:
        raise PeftAdapterError(f"{weights_path} has no 'prompt_embeddings' tensor (found {sorted(weights)})")
    prompt = weights["prompt_embeddings"]
    if prompt.dim() != 2 or prompt.shape[0] != int(config["num_virtual_tokens"]):
        raise PeftAdapterError(
            f"{weights_path} holds prompt_embeddings {tuple(prompt.shape)}, not num_virtual_tokens="
            f"{config['num_virtual_tokens']} rows"
        )
    return config, prompt.float()


def import_peft(folder: str | Path, backbone: Backbone, task: str, origin_seed: int) -> TaskPromptVector:
    """The adapter's prompt minus the origin it was trained from, as a task prompt vector."""
    config, prompt = _read_adapter(folder)
    if config.get("task_type") != _task_type(backbone):
        raise PeftAdapterError(f"{folder} is a {config.get('task_type')} adapter; {backbone.backbone_id!r} needs {_task_type(backbone)}")
    if prompt.shape[1] != backbone.hidden_size:
        raise PeftAdapterError(f"adapter width {prompt.shape[1]} != backbone {backbone.backbone_id!r} width {backbone.hidden_size}")
    origin = make_origin(backbone, prompt.shape[0], origin_seed)
    return TaskPromptVector.from_prompts(
        prompt, origin, task=task, backbone_id=backbone.backbone_id, origin_seed=origin_seed, source=f"peft:{folder}"
    )
