"""The language model side of a VLM: the tiny random LMs the tests and presets name, and loading any causal LM.

`ModelConfig.lm` is either a `TINY_LMS` name (a tiny random Llama or Qwen2, seeded, sized to its offline
tokenizer in `vitune.data.tokenizer`) or a Hugging Face causal-LM path, whose embeddings grow to hold
`<image>`. `INIT_SEED` is the one seed of every fresh init (the tiny LMs here, the projector and the image
newline in `vitune.model.vlm`), drawn apart from the caller's RNG.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from vitune import IMAGE_TOKEN
from vitune.data import tokenizer as tokenizer_lib

logger = logging.getLogger(__name__)

TINY_LM = "tiny"
TINY_QWEN2_LM = tokenizer_lib.TINY_QWEN2
INIT_SEED = 0


def _seeded(build: Any) -> nn.Module:
    """``build()`` under the fixed init seed, leaving the caller's RNG untouched: the same weights every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return build()


def build_tiny_lm(tokenizer: Any) -> nn.Module:
    """A tiny random Llama (hidden 64, 2 layers) sized to `tokenizer`; the same weights every time."""
    # deferred: transformers is slow to import and not every caller needs it
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def build_tiny_qwen2_lm(tokenizer: Any) -> nn.Module:
    """A tiny random Qwen2 (hidden 64, 2 layers, GQA 4 query / 2 KV heads, q/k/v bias) sized to `tokenizer`; the
    same weights every time.

    Untied output embeddings, as Qwen2-7B (Qwen2-0.5B ties them; the export tests build a tied Qwen2 of their own):
    tied at width 64, the model learned to read the image about 3x slower on the synthetic set (one process, lr
    2e-3, 200 finetune steps: held-out 0.27, the answer priors only, against 0.64 untied).
    """
    # deferred: transformers is slow to import and not every caller needs it
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=1000000.0,  # Qwen2's
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _seeded(lambda: Qwen2ForCausalLM(config))


@dataclass(frozen=True)
class TinyLM:
    """A tiny random LM preset: its builder and the offline tokenizer (`vitune.data.tokenizer`) it is sized to."""

    build: Any  # (tokenizer) -> nn.Module
    tokenizer: str


# `ModelConfig.lm` names that build a tiny random LM instead of loading a checkpoint; a config's `tokenizer:
# null` falls back to the lm name, which is also its tokenizer's name here
TINY_LMS = MappingProxyType({
    TINY_LM: TinyLM(build_tiny_lm, tokenizer="tiny"),
    TINY_QWEN2_LM: TinyLM(build_tiny_qwen2_lm, tokenizer=tokenizer_lib.TINY_QWEN2),
})


def load_lm(path: str, tokenizer: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """A `TINY_LMS` name → that tiny random LM; otherwise a Hugging Face causal LM, embeddings grown to the
    tokenizer."""
    if path in TINY_LMS:
        lm = TINY_LMS[path].build(tokenizer)
        return lm.to(dtype) if dtype is not None else lm
    if path.startswith("tiny") and not os.path.exists(path):
        # a mistyped preset name would otherwise go to the Hub and fail there with a less useful error
        raise ValueError(f"unknown tiny LM {path!r}; the tiny LMs are {sorted(TINY_LMS)}")
    # deferred: transformers is slow to import and not every caller needs it
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    vocab = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        logger.info("growing %s embeddings from %d to %d tokens for %s", path, vocab, len(tokenizer), IMAGE_TOKEN)
        lm.resize_token_embeddings(len(tokenizer))
    return lm
