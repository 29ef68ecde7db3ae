"""Origins and the trainable soft prompt, as the paper defines them.

An origin is L rows of the frozen model's own word embeddings, for L DISTINCT token ids drawn from the first 5,000
vocabulary entries by a seeded permutation (as the paper's code does): it is reproducible from (backbone, L, seed) alone, so a task prompt
vector trained on one origin can be applied to any other origin of the same backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tpv.backbone import Backbone
from tpv.errors import InvalidInput

ORIGIN_VOCAB = 5000


def origin_token_ids(prompt_length: int, seed: int, vocab_size: int) -> Tensor:
    """The token ids an origin is made of; torch's CPU generator keeps them identical on every machine."""
    pool = min(ORIGIN_VOCAB, vocab_size)
    if not 1 <= prompt_length <= pool:
        raise InvalidInput(f"prompt length must be between 1 and {pool} (distinct origin tokens), got {prompt_length}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(pool, generator=generator)[:prompt_length]


@torch.no_grad()
def make_origin(backbone: Backbone, prompt_length: int, seed: int) -> Tensor:
    """Origin O [L, d] in float32 on the CPU (embedded by the model's own input layer)."""
    ids = origin_token_ids(prompt_length, seed, backbone.vocab_size)
    return backbone.embed(ids).float().cpu().clone()


class SoftPrompt(nn.Module):
    """The only trainable tensor: L x d, kept in float32 whatever the backbone's dtype."""

    def __init__(self, init: Tensor):
        super().__init__()
        if init.dim() != 2 or not torch.isfinite(init).all():
            raise ValueError(f"a soft prompt starts from a finite [L, d] tensor, got shape {tuple(init.shape)}")
        self.weight = nn.Parameter(init.detach().float().clone())

    def forward(self) -> Tensor:
        return self.weight.unsqueeze(0)
