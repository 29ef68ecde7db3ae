"""Decoding policy over a `tpv.backbone.Decoding`: greedy or sampled tokens, stop strings, finished rows leaving.

The backbone runs the batch (each row from its own composition's cached prompt keys/values); this module decides
each row's next token and when it is done, and reports text as it is decided so a server can stream it:

- temperature 0 is greedy (argmax, the same tokens as the uncached reference); above 0, softmax(logp / T) cut to
  the smallest set of tokens whose probability reaches `top_p`, sampled with the row's own seeded generator.
- a row stops at EOS, at one of its `stop` strings (the text ends before it, never showing it), or after
  `max_new_tokens`; it then leaves the batch, so the next step runs only the rows still going.
- text is reported once it can no longer change: a tail that may be the start of a stop string, or half of a
  multi-byte character, waits for the next token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from torch import Tensor

from tpv.backbone import Backbone, Decoding
from tpv.errors import InvalidInput

FinishReason = Literal["stop", "length"]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class SamplingParams(BaseModel):
    """How one row picks its tokens and when it stops (the OpenAI API's names and ranges)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_new_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (ignored when greedy)")
    stop: tuple[StopText, ...] = Field((), max_length=4, description="the text ends before the first of these")
    seed: int | None = Field(None, ge=0, lt=2**63, description="a sampled row's generator seed; None: random")


@dataclass(frozen=True)
class Delta:
    """What one row added in one step: its token (None at EOS), the text that became final (maybe empty), and
    why it finished when it did."""

    row: int
    token: int | None
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    token_ids: list[int]  # generated, EOS not included
    prompt_tokens: int


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still change: a partial character, or the start of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _Row:
    """One row's state: its tokens, the text reported so far, its sampler."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.tokens: list[int] = []
        self.sent = 0
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def pick(self, logprobs: Tensor) -> int:
        """Greedy at temperature 0; else a nucleus sample from softmax(logprobs / T)."""
        if self.generator is None:
            return int(logprobs.argmax())
        top = logprobs.float().cpu()
        probs = torch.softmax((top - top.max()) / self.params.temperature, dim=-1)  # the best stays 0: no NaN
        if self.params.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            before = ordered.cumsum(0) - ordered  # mass of the more likely tokens
            ordered[before >= self.params.top_p] = 0.0  # the first token always stays (before = 0)
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def decode(backbone: Backbone, decoding: Decoding, params: Sequence[SamplingParams]) -> Iterator[list[Delta]]:
    """Step `decoding` until every row is done; after each step yield one `Delta` per row that was running.

    Rows are numbered as in the batch that started `decoding`; each row follows its own `params`.
    """
    if len(params) != decoding.logprobs.shape[0]:
        raise InvalidInput(f"{len(params)} sampling params for a batch of {decoding.logprobs.shape[0]} rows")
    tokenizer = backbone.tokenizer
    eos = _eos_ids(backbone)
    rows = [_Row(p) for p in params]
    running = list(range(len(rows)))  # batch rows still decoding, in the decoding's current row order
    logprobs = decoding.logprobs
    while running:
        picked = [rows[i].pick(logprobs[j]) for j, i in enumerate(running)]
        news, still = [], []
        for j, (i, token) in enumerate(zip(running, picked)):
            row = rows[i]
            finish: FinishReason | None = None
            if token in eos:
                finish, token = "stop", None
            else:
                row.tokens.append(token)
            text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min((k for k in (text.find(s) for s in row.params.stop) if k >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None and len(row.tokens) >= row.params.max_new_tokens:
                finish = "length"
            end = len(text) if finish else len(text) - _held_back(text, row.params.stop)
            news.append(Delta(i, token, text[row.sent : max(end, row.sent)], finish))
            row.sent = max(end, row.sent)
            if finish is None:
                still.append(j)
        yield news
        if not still:
            return
        if len(still) < len(running):
            keep = torch.tensor(still)
            decoding.keep(keep)
            running = [running[j] for j in still]
            picked = [picked[j] for j in still]
        logprobs = decoding.step(torch.tensor(picked))


class Transcript:
    """Whole completions from deltas, as they arrive (a drained stream, on either side of a handle)."""

    def __init__(self, rows: int) -> None:
        self.texts = [""] * rows
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.ends: list[FinishReason] = ["length"] * rows

    def add(self, news: Sequence[Delta]) -> None:
        for d in news:
            self.texts[d.row] += d.text
            if d.token is not None:
                self.tokens[d.row].append(d.token)
            if d.finish_reason:
                self.ends[d.row] = d.finish_reason

    def completions(self, prompt_tokens: Sequence[int]) -> list[Completion]:
        return [Completion(*row) for row in zip(self.texts, self.ends, self.tokens, prompt_tokens)]


def complete(backbone: Backbone, decoding: Decoding, params: Sequence[SamplingParams]) -> list[Completion]:
    """`decode` run to the end: each row's whole text."""
    transcript = Transcript(len(params))
    for news in decode(backbone, decoding, params):
        transcript.add(news)
    return transcript.completions(decoding.prompt_tokens)


def _eos_ids(backbone: Backbone) -> set[int]:
    """The tokenizer's EOS and any end-of-turn tokens the model's generation config lists (chat models)."""
    ids = {backbone.eos_id} if backbone.eos_id is not None else set()
    configured = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    return ids | set(configured or [])
