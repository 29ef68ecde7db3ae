"""The two deployments' `user_config`s: what the ingress enforces and what the model replica runs.

Changing either in a Serve config is a lightweight update (`reconfigure`); only a change of the model's backbone,
device, dtype or max_input_tokens reloads the model. Hard caps in `serve.schemas` hold whatever these say.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.auth import AuthSettings
from serve.schemas import HARD_MAX_CHARS, HARD_MAX_INPUTS, HARD_MAX_LABELS, HARD_MAX_NEW_TOKENS
from tpv.bundled import DEFAULT_BACKBONE
from tpv.compose import MAX_TERMS, MAX_WEIGHT

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class RequestLimits(BaseModel):
    """Per-request bounds the ingress enforces before anything reaches the model (422, 413 for the body)."""

    model_config = _STRICT

    max_inputs: int = Field(64, ge=1, le=HARD_MAX_INPUTS)
    max_input_chars: int = Field(4000, ge=1, le=HARD_MAX_CHARS,
                                 description="per input AFTER the template is filled: what the model sees")
    max_labels: int = Field(32, ge=2, le=HARD_MAX_LABELS)
    max_label_chars: int = Field(100, ge=1, le=1000)
    max_terms: int = Field(16, ge=1, le=MAX_TERMS, description="vectors in one composition")
    max_abs_weight: float = Field(10.0, gt=0, le=MAX_WEIGHT, description="bound on every |weight| and |coefficient|")
    max_new_tokens: int = Field(64, ge=1, le=HARD_MAX_NEW_TOKENS)
    max_body_bytes: int = Field(2_000_000, ge=1024, description="counted while the body is read, chunked or not")


class IngressSettings(BaseModel):
    """The HTTP deployment: limits, time bounds, retries on a lost model replica, API keys."""

    model_config = _STRICT

    limits: RequestLimits = Field(default_factory=RequestLimits)
    body_read_timeout_s: float = Field(10.0, gt=0, le=600, description="a client must send its whole body in this")
    slow_body_after_s: float = Field(0.25, gt=0, le=600, description="from then on, a body arriving slower than "
                                                                     "slow_body_bytes_per_s needs a slow-body slot")
    slow_body_bytes_per_s: float = Field(8_000, gt=0, description="bytes/s since the request began; slower "
                                                                   "bodies without a slot are cut off (408)")
    slow_body_slots: int = Field(64, ge=1, description="bodies read past slow_body_after_s at once; keep it well "
                                                       "under the deployment's max_ongoing_requests")
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="end to end, retries included: then 504")
    model_retries: int = Field(4, ge=0, le=20, description="re-sends of a request whose model replica died")
    retry_backoff_s: float = Field(0.2, ge=0, le=10, description="first wait before a re-send; doubles each time")
    health_timeout_s: float = Field(5.0, gt=0, le=60)
    auth: AuthSettings = Field(default_factory=AuthSettings)


class ModelSettings(BaseModel):
    """The model deployment: backbone, store, batching, the prompt cache and the limits only it can check."""

    model_config = _STRICT

    store_uri: str | None = Field(None, description="vector store folder or pyarrow URI; default $TPV_STORE or "
                                                     "$TPV_HOME/store")
    backbone: str = Field(DEFAULT_BACKBONE, description="bundled name or local from_pretrained folder")
    device: str | None = Field(None, description="cpu, cuda, cuda:0...; default cuda when the replica has a GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(32, ge=1, le=4096, description="rows (inputs) per forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    reload_interval_s: float = Field(2.0, ge=0.0, le=3600.0, description="store polling period (the reload window)")
    cache_max_entries: int = Field(256, ge=0, description="composed prompts + their keys/values, per replica")
    cache_max_bytes: int = Field(1 << 30, ge=0, description="the one prompt cache's byte bound, per replica")
    torch_threads: int | None = Field(None, ge=1, le=256, description="default: the replica's num_cpus")
    max_input_tokens: int = Field(256, ge=8, le=8192, description="per rendered input, counted by the tokenizer")
    max_prompt_length: int = Field(512, ge=1, le=4096, description="rows of a composed soft prompt")
