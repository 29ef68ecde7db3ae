"""What the ingress hands the model deployment: rendered inputs and a composition, nothing HTTP-specific.

Scoring and generation change nothing on the server (a job is a function of itself and the store version, sampled
tokens aside), so a job is safe to re-send to another replica when the one running it dies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.auth import Principal
from serve.schemas import InlineComposition
from tpv.generate import Completion, SamplingParams


@dataclass(frozen=True)
class ScoreJob:
    composition: InlineComposition | str  # inline, or a stored composition's name
    sources: list[str]  # inputs with their template filled: exactly what the model reads
    labels: list[str]


@dataclass(frozen=True)
class ModelName:
    """An OpenAI `model` id: a stored composition's name, else a task's (its task vectors). Resolved by the model
    replica, which has the store; the caller's key scope applies to what the name turns out to be."""

    name: str
    caller: Principal


@dataclass(frozen=True)
class GenerateJob:
    composition: InlineComposition | str | ModelName
    sources: list[str]  # the texts the model reads, or [] when `conversations` are given
    params: SamplingParams
    n: int = 1  # choices per source: rows source_0 x n, source_1 x n, ... (the OpenAI API's choice order)
    conversations: list[list[dict[str, str]]] = field(default_factory=list)  # [{role, content}]: the chat template
    source_field: str = "inputs"  # what the client calls its texts (inputs, prompt, messages): named in limit errors


@dataclass(frozen=True)
class ScoreResult:
    composition: dict  # the spec served (a stored one resolved, defaults filled)
    log_likelihoods: list[list[float]]  # [inputs, labels]


@dataclass(frozen=True)
class GenerationHead:
    """A generation stream's first item: what is served, how many tokens each source has (usage counts)."""

    composition: dict
    prompt_tokens: list[int]


@dataclass(frozen=True)
class GenerateResult:
    composition: dict
    completions: list[Completion]  # one per row (source x choice)
