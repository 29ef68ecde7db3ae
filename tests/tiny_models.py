"""Tiny random causal (Llama) and seq2seq (T5) models saved as real from_pretrained folders, for fast tests.

The tokenizer is a real byte-level BPE trained here on a few sentences, so tokenization is exercised for real.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "positive negative neutral yes no true false neither entailment contradiction",
    "the movie was great and the acting was wonderful",
    "the film was terrible and boring, a waste of time",
    "premise hypothesis question answer sentence label review text",
    "what is the capital of france? who wrote the book? how many people live there?",
    "business sport politics tech entertainment news about the economy",
] * 20


def _tokenizer(eos: str, pad: str, bos: str | None = None):
    """With `bos`, every text starts with it (a template like Gemma's and Llama's), as PEFT's inputs then do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [pad, eos] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos)


def build_tiny_causal(path: Path, seed: int = 0, bos: bool = False) -> Path:
    """A tiny Llama; `bos=True` gives it a tokenizer that adds BOS to every text (like Gemma-3's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer("<|endoftext|>", "<|pad|>", "<|bos|>" if bos else None)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_t5(path: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _tokenizer("</s>", "<pad>")
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_sharp_causal(path: Path, scale: float = 10.0, base: Path | None = None) -> Path:
    """The tiny causal model (or `base`) with its weights, norms aside, times `scale`. At their random init every
    prompt gives the same repeated token and barely moves label scores; sharper weights make the output depend on
    the prompt, so comparisons of texts or scores can fail."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = base or build_tiny_causal(path)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(scale)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path
