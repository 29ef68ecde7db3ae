"""What the ingress hands the model deployment: rendered inputs and a composition, nothing HTTP-specific.

Scoring and generation are pure functions of a job and the store version, so a job is safe to re-send to another
replica when the one running it dies.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.schemas import InlineComposition


@dataclass(frozen=True)
class ScoreJob:
    composition: InlineComposition | str  # inline, or a stored composition's name
    sources: list[str]  # inputs with their template filled: exactly what the model reads
    labels: list[str]


@dataclass(frozen=True)
class GenerateJob:
    composition: InlineComposition | str
    sources: list[str]
    max_new_tokens: int


@dataclass(frozen=True)
class ScoreResult:
    composition: dict  # the spec served (a stored one resolved, defaults filled)
    log_likelihoods: list[list[float]]  # [inputs, labels]


@dataclass(frozen=True)
class GenerateResult:
    composition: dict
    texts: list[str]
