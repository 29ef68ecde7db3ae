"""The OpenAI API's shapes for the routes of `serve.openai_api`: requests, responses, stream chunks, errors.

Requests take the fields the official clients send; a field we cannot honour is refused with a message naming it
(never silently ignored): `presence_penalty` other than 0, `logprobs`, `echo`, tools... Compositions reuse
`serve.schemas.CompositionRef` (an inline `tpv.compose.CompositionBody` or a stored name) as the extra body field
`composition`; the sampling fields become a `tpv.generate.SamplingParams`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from serve.schemas import HARD_MAX_INPUTS, HARD_MAX_NEW_TOKENS, CompositionRef, Text, _kind
from tpv.generate import FinishReason, SamplingParams, StopText
from tpv.names import Name

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
MAX_CHOICES = 16
MAX_MESSAGES = 256


# ---- requests -----------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = Field(False, description="a last chunk with the usage counts and no choices")


class SamplingFields(BaseModel):
    """The fields both routes share: which model, how to sample, how to answer."""

    model_config = _STRICT

    model: Name = Field(description="a stored composition's name, or a task's (its task vectors); see /v1/models. "
                                    "With `composition` set, only echoed back")
    composition: CompositionRef | None = Field(
        None, description="extra body field: an inline composition (or a stored one's name) served instead of `model`")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    stop: Annotated[
        Annotated[StopText, Tag("text")] | Annotated[list[StopText], Field(max_length=4), Tag("texts")],
        Discriminator(_kind, custom_error_type="stop_type", custom_error_message="stop is a string or a list of them"),
    ] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    user: Annotated[str, StringConstraints(max_length=256)] | None = Field(None, description="accepted, not used")
    presence_penalty: float = Field(0.0, description="only 0 (not supported)")
    frequency_penalty: float = Field(0.0, description="only 0 (not supported)")
    logit_bias: dict[str, float] | None = Field(None, description="only empty (not supported)")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; send 0 or leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; send {} or leave it out")
        return value

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                              seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions: continue each prompt after the composed soft prompt."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "sentiment-mix", "prompt": "review: a gripping, beautifully acted film sentiment:", "max_tokens": 4,
         "temperature": 0},
        {"model": "trec", "prompt": ["what is the capital of france?"], "n": 2, "temperature": 0.8, "stream": True,
         "composition": {"terms": [{"task": "trec", "weight": 0.7}, {"task": "rotten_tomatoes", "weight": 0.3}]}},
    ]})

    prompt: Annotated[
        Annotated[Text, Tag("text")]
        | Annotated[list[Text], Field(min_length=1, max_length=HARD_MAX_INPUTS), Tag("texts")],
        Discriminator(_kind, custom_error_type="prompt_type",
                      custom_error_message="prompt is a string or a list of strings"),
    ]
    max_tokens: int | None = Field(16, ge=1, le=HARD_MAX_NEW_TOKENS)
    echo: Literal[False] = Field(False, description="only false (not supported)")
    logprobs: None = Field(None, description="only null (not supported)")
    best_of: int | None = Field(None, ge=1, description="only null or n")
    suffix: None = Field(None, description="only null (not supported)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], int | list):
            raise ValueError("token-id prompts are not supported: send a string or a list of strings")
        return value

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported: leave it out or send it equal to n")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)



class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=100_000)]


class ChatMessage(BaseModel):
    """One turn; content is text, or a list of text parts (images and audio are not supported)."""

    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=100_000)] | Annotated[list[TextPart], Field(max_length=64)]
    name: Name | None = None

    def plain(self) -> dict[str, str]:
        """What a chat template reads: {role, content}, parts joined; `developer` is a system turn."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text"] = Field(description="only text (JSON modes are not supported)")


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: the conversation through the backbone's chat template, then the assistant's turn."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "sentiment-mix", "messages": [{"role": "user", "content": "Is this review positive? 'great fun'"}],
         "max_tokens": 16, "temperature": 0},
    ]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=HARD_MAX_NEW_TOKENS, description="default: the server's limit")
    max_completion_tokens: int | None = Field(None, ge=1, le=HARD_MAX_NEW_TOKENS, description="max_tokens' new name")
    logprobs: Literal[False] | None = Field(None, description="only false or null (not supported)")
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_bound(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [m.plain() for m in self.messages]


# ---- responses ----------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the prompts' text (the soft prompt is not counted)")
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A completion, or (object `text_completion` too, as OpenAI streams them) one chunk of a stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time of the newest vector it uses (0 for a stored composition)")
    owned_by: Literal["composition", "task"] = Field(description="what the id names")


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"object": "list", "data": [{"id": "sentiment-mix", "object": "model", "created": 0, "owned_by": "composition"},
                                    {"id": "trec", "object": "model", "created": 1767225600, "owned_by": "task"}]},
    ]})

    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "server_error...")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = Field(None, description="the service's own error kind (as the native routes' `error`)")


class OpenAIErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"message": "temperature: Input should be less than or equal to 2", "type": "invalid_request_error",
                   "param": "temperature", "code": "invalid_request"}},
    ]})

    error: OpenAIError
