"""Test fixtures written to disk: a byte-level tokenizer, a tiny Llama with it, and SNI task files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: every byte is one token, after three special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_causal_lm(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """Save a tiny Llama and the byte tokenizer to ``path``, loadable by the Auto classes."""
    tokenizer = make_byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TASKS = {
    "task001_reverse_word": (
        "Write the given word backwards.",
        [("cat", "tac"), ("dog", "god"), ("sun", "nus"), ("map", "pam"), ("pen", "nep"),
         ("cup", "puc"), ("box", "xob"), ("hat", "tah"), ("bus", "sub"), ("jam", "maj")],
    ),
    "task002_uppercase": (
        "Answer with the given word in capital letters.",
        [("red", "RED"), ("blue", "BLUE"), ("green", "GREEN"), ("pink", "PINK"), ("gold", "GOLD"),
         ("gray", "GRAY"), ("teal", "TEAL"), ("navy", "NAVY"), ("lime", "LIME"), ("plum", "PLUM")],
    ),
    "task003_count_letters": (
        "Count the letters of the given word.",
        [("a", "1"), ("ab", "2"), ("abc", "3"), ("abcd", "4"), ("abcde", "5"),
         ("xy", "2"), ("xyz", "3"), ("q", "1"), ("wxyz", "4"), ("vwxyz", "5")],
    ),
}


def write_sni_fixture(root: Path, tasks: dict = TASKS) -> Path:
    """Write SNI task files (natural-instructions layout) and a default train split to ``root``."""
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "default").mkdir(parents=True, exist_ok=True)
    for name, (definition, pairs) in tasks.items():
        content = {
            "Definition": [definition],
            "Categories": ["Test"],
            "Positive Examples": [],
            "Negative Examples": [],
            "Instances": [
                {"id": f"{name}-{index}", "input": source, "output": [target]}
                for index, (source, target) in enumerate(pairs)
            ],
        }
        (root / "tasks" / f"{name}.json").write_text(json.dumps(content))
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(tasks) + "\n")
    return root
