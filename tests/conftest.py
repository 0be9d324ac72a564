"""Shared fixtures: tiny transformers models built from configs, so no weights are downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_mode  # noqa: F401  registers the MODE adapter type

VOCAB_SIZE = 64


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def make_tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).to(dtype).eval()


@pytest.fixture
def token_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB_SIZE, (3, 11), generator=generator)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A tiny Llama saved as safetensors, so loaders that take a path can use it."""
    path = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    path = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(path)
    return str(path)
