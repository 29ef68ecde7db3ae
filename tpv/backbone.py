"""A frozen language model with soft prompts: ONE forward path, per-row prompts.

Every caller (training, evaluation, weight search, serving) goes through `_input_states`, which runs a batch whose
rows each carry their own prompt. A prompt is either a tensor `[B|1, L, d]` (1 broadcasts, as in training) or a
`PromptPrefix`: for causal models the prompt comes first, so its attention keys/values depend on the prompt alone
and can be computed once and reused across batches (evaluation, weight search, serving).

Causal inputs are laid out as PEFT prompt tuning lays them out: `[virtual tokens] + tokenizer(text)`, so a tokenizer
that starts every text with BOS (Gemma, Llama) gets its BOS right after the prompt; SmolLM2's adds none.

Logits are computed only where a loss or a score needs them (the target positions), never over every position
and the whole vocabulary: on a 49k-vocabulary model that is most of the step's cost.

Generation goes through `start_decoding`: a `Decoding` holds a batch's keys/values (causal: started from each row's
cached prompt prefix, prompts of different lengths side by side) and steps it one token at a time; rows can leave.
What to do with the log-probabilities (greedy, sampling, stop strings) is `tpv.generate`'s job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tpv.bundled import BUNDLED, DEFAULT_BACKBONE, resolve_model_path
from tpv.errors import InvalidInput


class BackboneInputError(InvalidInput):
    """Prompts, prefixes, sources or labels a backbone cannot run."""


class BackboneConfig(BaseModel):
    """Which frozen model, where it runs, and how long its inputs may be."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_BACKBONE, description="a bundled name, a local from_pretrained folder, or a hub id "
                       "(t5-base, meta-llama/Llama-3.1-8B-Instruct) in the HF cache: tpv.hub_models")
    device: str | None = Field(None, description="cpu, cuda, cuda:1...; None picks cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_source_tokens: int = Field(256, ge=8, description="longer sources keep their last tokens")
    max_target_tokens: int = Field(16, ge=1)
    gradient_checkpointing: bool = Field(
        False, description="training recomputes every layer's activations in the backward pass instead of keeping "
        "them (tpv.packed.recomputed_layers: exact, one more forward per step); for a large backbone whose step "
        "would not fit otherwise",
    )

    @classmethod
    def as_trained(cls, model: str, train_config: Mapping[str, Any], max_source_tokens: int | None = None
                   ) -> BackboneConfig:
        """The config that scores a stored vector on inputs cut as in its training run (`train_config`, the
        vector's metadata), unless `max_source_tokens` is given: a prompt tuned on 64-token inputs is judged on them."""
        cut = max_source_tokens or train_config.get("backbone", {}).get("max_source_tokens")
        return cls(model=model, **({"max_source_tokens": cut} if cut else {}))


@dataclass(frozen=True)
class PromptPrefix:
    """Attention keys/values of soft prompts [N, heads, L, head_dim] per layer (causal backbones only).

    `last` is the final hidden state at the prompt's last position [N, d]: it predicts the first input token, which
    an empty source (no BOS) needs scored.
    """

    layers: tuple[tuple[Tensor, Tensor], ...]
    length: int
    last: Tensor

    @property
    def rows(self) -> int:
        return self.layers[0][0].shape[0]

    def select(self, index: Tensor) -> PromptPrefix:
        """Rows of this prefix in a new order (e.g. one composition per request in a mixed batch)."""
        index = index.to(self.layers[0][0].device)
        layers = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers)
        return PromptPrefix(layers, self.length, self.last.index_select(0, index))

    @staticmethod
    def cat(prefixes: list[PromptPrefix]) -> PromptPrefix:
        """Stack prefixes of equal length along rows."""
        if len({p.length for p in prefixes}) != 1:
            raise BackboneInputError("prompt prefixes of different lengths cannot share a batch")
        layers = tuple(
            (torch.cat([p.layers[i][0] for p in prefixes]), torch.cat([p.layers[i][1] for p in prefixes]))
            for i in range(len(prefixes[0].layers))
        )
        return PromptPrefix(layers, prefixes[0].length, torch.cat([p.last for p in prefixes]))

    def nbytes(self) -> int:
        tensors = [t for kv in self.layers for t in kv] + [self.last]
        return sum(t.numel() * t.element_size() for t in tensors)


Prompt = Tensor | PromptPrefix


def _pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _leading_bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer's own template starts every text with it (what PEFT's inputs then carry), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    marked = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if marked[:1] == [bos] and plain[:1] != [bos] else []


#: the source a causal label's tokens are read after (`Backbone.label_token_ids`); every scored source is checked
LABEL_REFERENCE = "x"


def _prefix_free(rows: list[list[int]]) -> bool:
    """True when no token sequence is a proper prefix of another (sorted, a prefix sits right before an extension)."""
    seqs = sorted(set(map(tuple, rows)))
    return not any(b[: len(a)] == a for a, b in pairwise(seqs))


def backbone_id_for(name_or_path: str) -> str:
    """A store-safe name: the bundled name; for a hub id (`owner/name`, not an existing path) owner and name
    lower-cased and joined by '--' as the HF cache names repositories (`meta-llama--llama-3.1-8b-instruct`); else
    the folder's base name lower-cased (a bare hub name such as `t5-base` reads the same either way)."""
    from pathlib import Path

    from tpv.hub_models import looks_like_hub_id

    if name_or_path in BUNDLED:
        return name_or_path
    if "/" in name_or_path and not Path(name_or_path).expanduser().exists() and looks_like_hub_id(name_or_path):
        base = name_or_path.lower().replace("/", "--")
    else:
        base = name_or_path.rstrip("/").split("/")[-1].lower()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip(".")
    while ".." in safe:
        safe = safe.replace("..", ".")
    return safe or "model"


class Backbone:
    """A frozen seq2seq or causal LM + tokenizer. Only prompts ever receive gradients."""

    def __init__(self, model, tokenizer, config: BackboneConfig):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.backbone_id = backbone_id_for(config.model)
        self.is_seq2seq = bool(model.config.is_encoder_decoder)
        self.hidden_size = int(model.get_input_embeddings().weight.shape[1])
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.bos_ids = [] if self.is_seq2seq else _leading_bos(tokenizer)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        # set by `tpv.packed.recomputed_layers`: a layer re-run in the backward pass would append to a cache twice,
        # so training's tensor prompts then score multi-token labels as (source, label) rows, without keys/values
        self.recomputing = False

    @classmethod
    def load(cls, config: BackboneConfig | str | None = None) -> Backbone:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per load floods Ray and CLI logs
        if not isinstance(config, BackboneConfig):
            config = BackboneConfig(model=config or DEFAULT_BACKBONE)
        path = resolve_model_path(config.model)
        device = _pick_device(config.device)
        dtype = _pick_dtype(config.dtype, device)
        model_config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, config)

    # ---- embeddings -------------------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings exactly as the model's own input layer makes them (Gemma scales by sqrt(d))."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ---- tokenization -----------------------------------------------------------------------------------------
    def _source_ids(self, sources: list[str]) -> list[list[int]]:
        """Seq2seq: the tokenizer's template (ends in EOS). Causal: the leading BOS if the tokenizer adds one, then
        the text. Longer sources keep their last tokens (and the BOS)."""
        return [self._bounded(ids) for ids in self.tokenizer(list(sources), add_special_tokens=self.is_seq2seq)["input_ids"]]

    def _bounded(self, ids: list[int]) -> list[int]:
        """A source's tokens as the model reads them: its last max_source_tokens (with the BOS, if any)."""
        return self.bos_ids + ids[-(self.config.max_source_tokens - len(self.bos_ids)):]

    def _joint_split(self, sources: list[str], labels: list[str]) -> list[tuple[list[int], list[int]]]:
        """Causal: every (source, label) pair, row-major, as the tokenizer reads the whole text `source + " " +
        label`: the tokens it shares with the source alone, then the rest (the label as the text spells it). A
        label tokenized alone can differ: SentencePiece tokenizers (Llama-2, Mistral) read " positive" as a lone
        word-start mark plus "positive"."""
        alone = self.tokenizer(list(sources), add_special_tokens=False)["input_ids"]
        joint = self.tokenizer([s + " " + label for s in sources for label in labels],
                               add_special_tokens=False)["input_ids"]
        out = []
        for i, ids in enumerate(joint):
            src = alone[i // len(labels)]
            k = next((j for j, (a, b) in enumerate(zip(src, ids)) if a != b), min(len(src), len(ids)))
            out.append((ids[:k], ids[k:]))
        return out

    def _target_ids(self, targets: list[str], eos: bool) -> list[list[int]]:
        """Causal targets follow the source after a space; seq2seq targets are decoder labels ending in EOS."""
        if self.is_seq2seq:
            ids = self.tokenizer(list(targets), add_special_tokens=True)["input_ids"]
        else:
            ids = self.tokenizer([" " + t for t in targets], add_special_tokens=False)["input_ids"]
            if eos:
                ids = [row + [self.eos_id] for row in ids]
        return [row[: self.config.max_target_tokens] for row in ids]

    def label_token_ids(self, labels: list[str]) -> list[list[int]]:
        """The tokens each label (stripped: it is scored as the text it is) is scored on after a source (all length
        1: the one-forward fast path).

        Causal labels are their tokens in the joint tokenization of a source + " " + label (`_joint_split`, after
        the reference source `LABEL_REFERENCE`); `label_scores` checks every scored source against that split. They
        end in EOS only when one label's tokens are a proper prefix of another's (see `label_scores`); seq2seq labels
        always end in EOS (decoder targets).
        """
        labels = [label.strip() for label in labels]
        if self.is_seq2seq:
            return self._target_ids(labels, eos=False)
        ids, end = self._causal_labels(labels)
        return [row + end for row in ids]

    def _causal_labels(self, labels: list[str]) -> tuple[list[list[int]], list[int]]:
        """Stripped labels' tokens after `LABEL_REFERENCE`, and the end marker the set needs ([EOS] or [])."""
        ids = [label for _, label in self._joint_split([LABEL_REFERENCE], labels)]
        if _prefix_free(ids):
            return ids, []
        if self.eos_id is None:
            raise BackboneInputError(f"labels {labels} need an end marker (one begins another) but the tokenizer has no EOS")
        return ids, [self.eos_id]

    def _pad(self, rows: list[list[int]], left: bool = False) -> tuple[Tensor, Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if left:
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
            else:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---- the one forward path ---------------------------------------------------------------------------------
    def prefix(self, prompts: Tensor) -> PromptPrefix:
        """Compute the keys/values of prompts [N, L, d] once (causal backbones)."""
        if self.is_seq2seq:
            raise BackboneInputError("prompt prefixes apply to causal backbones; seq2seq prompts go through the encoder")
        prompts = self._as_batch(prompts, None)
        out = self.model.base_model(inputs_embeds=prompts, use_cache=True)
        layers = tuple((layer.keys, layer.values) for layer in out.cache.layers)
        return PromptPrefix(layers, prompts.shape[1], out.last_hidden_state[:, -1])

    def _as_batch(self, prompts: Tensor, rows: int | None) -> Tensor:
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 3 or prompts.shape[-1] != self.hidden_size or prompts.shape[1] < 1:
            raise BackboneInputError(
                f"prompts must be [B, L, {self.hidden_size}] or [L, {self.hidden_size}] with L >= 1, got {tuple(prompts.shape)}"
            )
        prompts = prompts.to(self.device, self.dtype)
        if rows is not None and prompts.shape[0] != rows:
            if prompts.shape[0] != 1:
                raise BackboneInputError(f"{prompts.shape[0]} prompts for a batch of {rows} rows")
            prompts = prompts.expand(rows, -1, -1)
        return prompts

    def _input_hidden(self, prompt: Prompt, ids: Tensor, mask: Tensor) -> Tensor:
        """Causal, prompt first, one row one prompt: final hidden states [B, T + 1, d] where index i is the state that
        predicts input token i (index 0: the prompt's last position; index T: after the last input token)."""
        return self._input_states(prompt, ids, mask)[0]

    def _input_states(self, prompt: Prompt, ids: Tensor, mask: Tensor, keep_cache: bool = False
                      ) -> tuple[Tensor, object | None, Tensor]:
        """`_input_hidden`, with the attention mask of prompt + inputs [B, L + T] and their keys/values (a
        transformers cache; a tensor prompt keeps them only with `keep_cache`): what tokens that continue the rows
        need (`_label_tail_scores`)."""
        rows, width = ids.shape
        if isinstance(prompt, PromptPrefix):
            prefix = prompt if prompt.rows == rows else prompt.select(torch.zeros(rows, dtype=torch.long, device=self.device))
            if prefix.rows != rows:
                raise BackboneInputError(f"{prompt.rows} prompt prefixes for a batch of {rows} rows")
            length, cache = prefix.length, self._cache(prefix.layers)
            full_mask = torch.cat([torch.ones(rows, length, dtype=mask.dtype, device=self.device), mask], dim=1)
            if width == 0:
                return prefix.last.unsqueeze(1), cache, full_mask
            positions = torch.arange(length, length + width, device=self.device).unsqueeze(0).expand(rows, -1)
            hidden = self._after_cache(cache, ids, full_mask, positions)
            return torch.cat([prefix.last.unsqueeze(1).to(hidden.dtype), hidden], dim=1), cache, full_mask
        prompts = self._as_batch(prompt, rows)
        length = prompts.shape[1]
        embeds = torch.cat([prompts, self.embed(ids)], dim=1)
        full_mask = torch.cat([torch.ones(rows, length, dtype=mask.dtype, device=self.device), mask], dim=1)
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=keep_cache)
        return out.last_hidden_state[:, length - 1 :], out.cache if keep_cache else None, full_mask

    def _cache(self, layers: tuple[tuple[Tensor, Tensor], ...]):
        """A transformers cache holding `layers` (later steps concatenate: the tensors given are never modified)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _after_cache(self, cache, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Causal: final hidden states [B, T, d] of tokens `ids` run after the keys/values in `cache` (which grows by
        them); `mask` covers cache + tokens, `positions` are the tokens' own (a row's padding takes no position)."""
        out = self.model.base_model(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=positions,
                                    cache=cache, use_cache=True)
        return out.last_hidden_state

    def _logprobs_at(self, hidden: Tensor) -> Tensor:
        """Log-probabilities over the vocabulary for the gathered hidden states [N, d] only."""
        logits = self.model.get_output_embeddings()(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return torch.log_softmax(logits, dim=-1)

    def _target_logprobs(self, prompt: Prompt, sources: list[str], target_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Per-token log-probabilities of the targets [N_tokens] and the row of each token [N_tokens]."""
        return self._target_logprobs_ids(prompt, self._source_ids(sources), target_ids)

    def _target_logprobs_ids(self, prompt: Prompt, source_ids: list[list[int]], target_ids: list[list[int]]
                             ) -> tuple[Tensor, Tensor]:
        """`_target_logprobs` of sources given as the token ids the model reads."""
        if self.is_seq2seq:
            return self._seq2seq_target_logprobs(prompt, source_ids, target_ids)
        ids, mask = self._pad([s + t for s, t in zip(source_ids, target_ids)])
        hidden = self._input_hidden(prompt, ids, mask)
        row_index, pos_index, token_ids = [], [], []
        for row, (s, t) in enumerate(zip(source_ids, target_ids)):
            for j, tok in enumerate(t):
                row_index.append(row)
                pos_index.append(len(s) + j)  # the state at index p predicts input token p
                token_ids.append(tok)
        rows_t = torch.tensor(row_index, device=self.device)
        picked = hidden[rows_t, torch.tensor(pos_index, device=self.device)]
        logp = self._logprobs_at(picked).gather(1, torch.tensor(token_ids, device=self.device).unsqueeze(1)).squeeze(1)
        return logp, rows_t

    def _seq2seq_target_logprobs(self, prompt: Prompt, source_ids, target_ids) -> tuple[Tensor, Tensor]:
        if isinstance(prompt, PromptPrefix):
            raise BackboneInputError("prompt prefixes apply to causal backbones only")
        ids, mask = self._pad(source_ids)
        prompts = self._as_batch(prompt, ids.shape[0])
        embeds = torch.cat([prompts, self.embed(ids)], dim=1)
        full_mask = torch.cat([torch.ones(ids.shape[0], prompts.shape[1], dtype=mask.dtype, device=self.device), mask], 1)
        labels, label_mask = self._pad(target_ids)
        labels = labels.masked_fill(label_mask == 0, -100)
        logits = self.model(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).logits.float()
        logp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
        keep = label_mask.bool()
        rows_t = torch.arange(ids.shape[0], device=self.device).unsqueeze(1).expand_as(keep)[keep]
        return logp[keep], rows_t

    # ---- what callers use -------------------------------------------------------------------------------------
    def loss(self, prompt: Prompt, sources: list[str], targets: list[str]) -> Tensor:
        """Mean token cross-entropy of the targets (causal targets end in EOS so generation stops)."""
        logp, _ = self.target_logprobs(prompt, sources, targets)
        return -logp.mean()

    def target_logprobs(self, prompt: Prompt, sources: list[str], targets: list[str]) -> tuple[Tensor, Tensor]:
        """The log-probability of every target token (targets end in EOS) and the row each token belongs to: the
        terms of `loss`, so a batch of rows from several runs yields each run's own loss."""
        self._check_rows(prompt, len(sources))
        return self._target_logprobs(prompt, sources, self._target_ids(targets, eos=True))

    @torch.no_grad()
    def score_labels(self, prompt: Prompt, sources: list[str], labels: list[str]) -> Tensor:
        """Each label's log-likelihood after each source, as `label_scores` defines it: [B, C] on the CPU."""
        return self.label_scores(prompt, sources, labels).cpu()

    def label_loss(self, prompt: Prompt, sources: list[str], labels: list[str], gold: list[int]) -> Tensor:
        """Cross-entropy over the task's label set only (training as rank classification is evaluated).

        Unlike `loss`, nothing here rewards emitting label-shaped words or EOS in general: that part of the LM
        loss is the same for every task, and at a random origin it is what moves a prompt most.
        """
        scores = self.label_scores(prompt, sources, labels)
        return torch.nn.functional.cross_entropy(scores, torch.tensor(gold, dtype=torch.long, device=scores.device))

    def label_scores(self, prompt: Prompt, sources: list[str], labels: list[str]) -> Tensor:
        """`score_labels` with gradients, on the backbone's device.

        A label's score is log P(its `label_token_ids` | prompt, source), summed over tokens, with no length
        normalization. Without an end marker that is the probability that the continuation BEGINS with the label.
        For a prefix-free label set those events are disjoint, so scores compare like probabilities whatever the
        labels' lengths (a multi-token label is not penalized: its score is the model's probability of the whole
        string). When one label's tokens begin another's ('true' / 'true story'), P(begins with 'true') contains
        P('true story') and the longer label could never win: only then are labels scored as complete strings, tokens
        then EOS. On causal backbones each source runs once: every label's first token is scored from the state
        after it (B rows, all a set of single-token labels needs), and longer labels' other tokens run after the
        source's keys/values (`_label_tail_scores`). Otherwise (seq2seq, and layers being recomputed: `recomputing`)
        each (source, label) pair of a multi-token set is a row.
        """
        self._check_rows(prompt, len(sources))
        if not labels:
            raise BackboneInputError("no labels to score")
        label_ids = self.label_token_ids(labels)
        rows, n_labels = len(sources), len(labels)
        single = all(len(t) == 1 for t in label_ids)
        if not self.is_seq2seq:
            stripped = [label.strip() for label in labels]
            pairs, (_, end) = self._joint_split(sources, stripped), self._causal_labels(stripped)
            alone = self.tokenizer(list(sources), add_special_tokens=False)["input_ids"]
            if any(src != alone[i // n_labels] or lab + end != label_ids[i % n_labels]
                   for i, (src, lab) in enumerate(pairs)):
                # a source whose text joins the label differently (a trailing space...): each pair as its text reads
                each = torch.arange(rows, device=self.device).repeat_interleave(n_labels)
                expanded = (prompt.select(each) if isinstance(prompt, PromptPrefix) and prompt.rows > 1
                            else self._repeat_rows(prompt, rows, n_labels))
                logp, row_of = self._target_logprobs_ids(
                    expanded, [self._bounded(src) for src, _ in pairs],
                    [lab + end for _, lab in pairs])
                scores = torch.zeros(rows * n_labels, device=self.device, dtype=logp.dtype).index_add(0, row_of, logp)
                return scores.view(rows, n_labels)
        if not self.is_seq2seq and (single or isinstance(prompt, PromptPrefix) or not self.recomputing):
            source_ids = self._source_ids(sources)
            ids, mask = self._pad(source_ids)
            hidden, cache, full_mask = self._input_states(prompt, ids, mask, keep_cache=not single)
            last = torch.tensor([len(s) for s in source_ids], device=self.device)
            logp = self._logprobs_at(hidden[torch.arange(rows, device=self.device), last])
            scores = logp[:, torch.tensor([t[0] for t in label_ids], device=self.device)]
            if single:
                return scores
            starts = full_mask.shape[1] - ids.shape[1] + last  # each row's first label token's position
            return scores + self._label_tail_scores(cache, full_mask, starts, label_ids)
        expanded = self._repeat_rows(prompt, rows, n_labels)
        logp, row_of = self._target_logprobs(
            expanded, [s for s in sources for _ in labels], [t for _ in sources for t in label_ids]
        )
        scores = torch.zeros(rows * n_labels, device=self.device, dtype=logp.dtype).index_add(0, row_of, logp)
        return scores.view(rows, n_labels)

    def _label_tail_scores(self, cache, mask: Tensor, starts: Tensor, label_ids: list[list[int]]) -> Tensor:
        """Causal: the summed log-probabilities [B, C] of every label's tokens after its first, each label run after
        its row's cached prompt + source (`cache`, `mask` [B, L + T]; a label's first token sits at `starts`).

        A source runs once and only the labels' short tails run C times, where a (source, label) row each would run
        the source C times (trec's 6 labels, snips's 7)."""
        rows, n = mask.shape[0], len(label_ids)
        cache.batch_repeat_interleave(n)  # row b * n + j: row b's keys/values, for label j
        tails, tail_mask = self._pad([t[:-1] for _ in range(rows) for t in label_ids])
        positions = starts.repeat_interleave(n).unsqueeze(1) + torch.arange(tails.shape[1], device=self.device)
        hidden = self._after_cache(cache, tails, torch.cat([mask.repeat_interleave(n, dim=0), tail_mask], dim=1),
                                   positions)
        row_index, pos_index, token_ids = [], [], []
        for row in range(rows * n):
            for k, tok in enumerate(label_ids[row % n][1:]):  # the state at tail index k predicts token k + 1
                row_index.append(row)
                pos_index.append(k)
                token_ids.append(tok)
        rows_t = torch.tensor(row_index, device=self.device)
        picked = hidden[rows_t, torch.tensor(pos_index, device=self.device)]
        logp = self._logprobs_at(picked).gather(1, torch.tensor(token_ids, device=self.device).unsqueeze(1)).squeeze(1)
        return torch.zeros(rows * n, device=self.device, dtype=logp.dtype).index_add(0, rows_t, logp).view(rows, n)

    def _check_rows(self, prompt: Prompt, rows: int) -> None:
        """Fail before any work when a batch brings neither one prompt nor one per row."""
        n = prompt.rows if isinstance(prompt, PromptPrefix) else self._as_batch(prompt, None).shape[0]
        if n not in (1, rows):
            raise BackboneInputError(f"{n} prompts for a batch of {rows} rows")
        if not rows:
            raise BackboneInputError("an empty batch: give at least one source")

    def _repeat_rows(self, prompt: Prompt, rows: int, times: int) -> Prompt:
        if isinstance(prompt, PromptPrefix):  # seq2seq: `_seq2seq_target_logprobs` says prefixes do not apply
            return prompt
        prompts = self._as_batch(prompt, None)
        return prompts if prompts.shape[0] == 1 else prompts.repeat_interleave(times, dim=0)

    @torch.no_grad()
    def start_decoding(self, prompts: Tensor | PromptPrefix | Sequence[PromptPrefix], sources: list[str]) -> Decoding:
        """A batch ready to decode: every row's prompt and source run once, the next-token log-probabilities ready.

        `prompts`: one prompt or one per row, as a tensor [B|1, L, d], a `PromptPrefix` (causal), or a list with one
        entry per row whose lengths may differ (a mixed serving batch): 1-row prefixes (causal: each composition's
        cached keys/values are gathered, never recomputed) or prompts [L, d] (seq2seq).
        """
        if not sources:
            raise BackboneInputError("an empty batch: give at least one source")
        if self.is_seq2seq:
            if isinstance(prompts, PromptPrefix) or any(isinstance(p, PromptPrefix) for p in prompts):
                raise BackboneInputError("prompt prefixes apply to causal backbones; seq2seq prompts go through the "
                                         "encoder")
            if isinstance(prompts, Tensor):
                prompts = list(self._as_batch(prompts, len(sources)))
            if len(prompts) != len(sources):
                raise BackboneInputError(f"{len(prompts)} prompts for a batch of {len(sources)} rows")
            return _Seq2SeqDecoding(self, [self._as_batch(p, 1)[0] for p in prompts], self._source_ids(sources))
        if isinstance(prompts, Tensor):
            prompts = self.prefix(prompts)
        if isinstance(prompts, PromptPrefix):
            self._check_rows(prompts, len(sources))
            rows = [prompts] if prompts.rows == 1 else [prompts.select(torch.tensor([i])) for i in range(prompts.rows)]
            row_of = [0] * len(sources) if prompts.rows == 1 else list(range(len(sources)))
        else:
            if len(prompts) != len(sources):
                raise BackboneInputError(f"{len(prompts)} prompt prefixes for a batch of {len(sources)} rows")
            slot: dict[int, int] = {}
            rows, row_of = [], []
            for p in prompts:
                if p.rows != 1:
                    raise BackboneInputError(f"a per-row prompt prefix has 1 row, got {p.rows}")
                if id(p) not in slot:
                    slot[id(p)] = len(rows)
                    rows.append(p)
                row_of.append(slot[id(p)])
        return _CausalDecoding(self, rows, row_of, self._source_ids(sources))

    @torch.no_grad()
    def generate(self, prompt: Tensor, sources: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy generation after the soft prompt (`tpv.generate`'s decoding loop); only the new text, stripped."""
        from tpv.generate import SamplingParams, complete

        self._check_rows(prompt, len(sources))
        params = SamplingParams(max_new_tokens=max_new_tokens)
        done = complete(self, self.start_decoding(prompt, sources), [params] * len(sources))
        return [c.text.strip() for c in done]


class Decoding(ABC):
    """Rows decoded together, one token per `step`; `logprobs` [rows, vocab] (float32) predicts each row's next token.

    `keep(index)` drops the other rows (finished ones leave the batch, so later steps cost only the rows still
    running). `prompt_tokens` counts each row's source tokens (BOS included, the soft prompt not).
    """

    logprobs: Tensor
    prompt_tokens: list[int]

    @abstractmethod
    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per running row; the log-probabilities of the token after it."""

    @abstractmethod
    def keep(self, index: Tensor) -> None:
        """Keep only these rows (positions in the current order), in this order."""


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    """`t` with zeros before it along `dim` up to `length` (a shorter prompt beside longer ones, masked out)."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _CausalDecoding(Decoding):
    """Cache slots: [prompt, left-padded to the longest] [source, right-padded] [new tokens]; the mask hides padding
    and each row's positions count only its own tokens, so every row sees exactly what it would see alone."""

    def __init__(self, bb: Backbone, prefixes: list[PromptPrefix], row_of: list[int], source_ids: list[list[int]]):
        self.bb = bb
        dev = bb.device
        longest = max(p.length for p in prefixes)
        index = torch.tensor(row_of, device=dev)
        layers = tuple(
            (torch.cat([_left_pad(p.layers[i][0], longest, 2) for p in prefixes]).index_select(0, index),
             torch.cat([_left_pad(p.layers[i][1], longest, 2) for p in prefixes]).index_select(0, index))
            for i in range(len(prefixes[0].layers))
        )
        lengths = torch.tensor([prefixes[j].length for j in row_of], device=dev)
        prompt_mask = (torch.arange(longest, device=dev).unsqueeze(0) >= (longest - lengths).unsqueeze(1)).long()
        last = torch.cat([p.last for p in prefixes]).index_select(0, index)
        self.cache = bb._cache(layers)
        self.prompt_tokens = [len(s) for s in source_ids]
        src_len = torch.tensor(self.prompt_tokens, device=dev)
        if max(self.prompt_tokens) == 0:  # nothing to run: the prompts' last states predict the first token
            self.mask, hidden = prompt_mask, last
        else:
            ids, src_mask = bb._pad(source_ids)
            self.mask = torch.cat([prompt_mask, src_mask], dim=1)
            positions = lengths.unsqueeze(1) + torch.arange(ids.shape[1], device=dev).unsqueeze(0)
            out = bb._after_cache(self.cache, ids, self.mask, positions)
            states = torch.cat([last.unsqueeze(1).to(out.dtype), out], dim=1)  # index i predicts source token i
            hidden = states[torch.arange(len(row_of), device=dev), src_len]
        self.positions = lengths + src_len  # the next token's position, per row
        self.logprobs = bb._logprobs_at(hidden)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        hidden = self.bb._after_cache(self.cache, tokens.to(self.bb.device).unsqueeze(1), self.mask,
                                      self.positions.unsqueeze(1))
        self.positions = self.positions + 1
        self.logprobs = self.bb._logprobs_at(hidden[:, -1])
        return self.logprobs

    def keep(self, index: Tensor) -> None:
        index = index.to(self.bb.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask.index_select(0, index), self.positions.index_select(0, index)


class _Seq2SeqDecoding(Decoding):
    """The encoder runs once over [prompt][source]; the decoder steps from its start token with its own cache."""

    def __init__(self, bb: Backbone, prompts: list[Tensor], source_ids: list[list[int]]):
        from transformers import DynamicCache, EncoderDecoderCache

        self.bb = bb
        ids, mask = bb._pad(source_ids)
        rows = ids.shape[0]
        longest = max(p.shape[0] for p in prompts)
        lengths = torch.tensor([p.shape[0] for p in prompts], device=bb.device)
        prompt_mask = (torch.arange(longest, device=bb.device).unsqueeze(0) >= (longest - lengths).unsqueeze(1))
        self.enc_mask = torch.cat([prompt_mask.to(mask.dtype), mask], 1)
        embeds = torch.cat([torch.stack([_left_pad(p, longest, 0) for p in prompts]), bb.embed(ids)], 1)
        self.encoded = bb.model.get_encoder()(inputs_embeds=embeds, attention_mask=self.enc_mask).last_hidden_state
        self.cache = EncoderDecoderCache(DynamicCache(config=bb.model.config), DynamicCache(config=bb.model.config))
        self.prompt_tokens = [len(s) for s in source_ids]
        start = bb.model.config.decoder_start_token_id
        self.step(torch.full((rows,), start, dtype=torch.long))

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        out = self.bb.model(encoder_outputs=(self.encoded,), attention_mask=self.enc_mask,
                            decoder_input_ids=tokens.to(self.bb.device).unsqueeze(1), cache=self.cache,
                            use_cache=True)
        self.cache = out.cache
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return self.logprobs

    def keep(self, index: Tensor) -> None:
        index = index.to(self.bb.device)
        self.cache.batch_select_indices(index)
        self.encoded, self.enc_mask = self.encoded.index_select(0, index), self.enc_mask.index_select(0, index)
