"""Prompt building, tokenisation with prompt masking, and padding for causal language models."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .sni import DEFAULT_PROMPT_TEMPLATE

IGNORE_INDEX = -100
MIN_DEFINITION_TOKENS = 16


def validate_prompt_template(template: str) -> None:
    """Raise ValueError unless ``template`` uses exactly the fields {definition} and {input}, once each."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if sorted(fields) != ["definition", "input"]:
        raise ValueError(
            f"prompt_template must contain {{definition}} and {{input}} once each and no other field, got "
            f"fields {fields} in {template!r}."
        )


def _template_pieces(template: str) -> list[tuple[str, Optional[str]]]:
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


@dataclass
class PromptTokenizer:
    """Tokenises SNI prompts and targets into token ids.

    The prompt is ``template`` with the task definition and the instance input filled in.
    Each literal part of the template, the definition and the input are tokenised separately
    and concatenated, so truncation can be exact. When the prompt exceeds
    ``max_source_length`` tokens, the definition is shortened first (keeping its start, down
    to 16 tokens), then the input (keeping its end, where SNI inputs put the question).
    The target is the reference followed by the end-of-sequence token, at most
    ``max_target_length`` tokens.
    """

    tokenizer: PreTrainedTokenizerBase
    template: str = DEFAULT_PROMPT_TEMPLATE
    max_source_length: int = 256
    max_target_length: int = 64

    def __post_init__(self):
        validate_prompt_template(self.template)
        if self.max_source_length < 32:
            raise ValueError(f"max_source_length must be at least 32 tokens, got {self.max_source_length}.")
        if self.max_target_length < 2:
            raise ValueError(f"max_target_length must be at least 2 tokens, got {self.max_target_length}.")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no end-of-sequence token, which marks the end of each target.")
        self._pieces = [
            (self._encode(literal), name) for literal, name in _template_pieces(self.template)
        ]
        prefix = self.tokenizer("a", add_special_tokens=True).input_ids
        plain = self._encode("a")
        self._special_prefix = prefix[: len(prefix) - len(plain)] if prefix[-len(plain):] == plain else []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def prompt_ids(self, definition: str, input_text: str) -> list[int]:
        """Return the token ids of the prompt, truncated to ``max_source_length``."""
        fields = {"definition": self._encode(definition), "input": self._encode(input_text)}
        fixed = len(self._special_prefix) + sum(len(literal) for literal, _ in self._pieces)
        overflow = fixed + len(fields["definition"]) + len(fields["input"]) - self.max_source_length
        if overflow > 0:
            removable = max(0, len(fields["definition"]) - MIN_DEFINITION_TOKENS)
            cut = min(overflow, removable)
            fields["definition"] = fields["definition"][: len(fields["definition"]) - cut]
            overflow -= cut
        if overflow > 0:
            fields["input"] = fields["input"][overflow:]

        ids = list(self._special_prefix)
        for literal, name in self._pieces:
            ids.extend(literal)
            if name is not None:
                ids.extend(fields[name])
        return ids[: self.max_source_length]

    def target_ids(self, target: str) -> list[int]:
        """Return the token ids of ``target`` followed by the end-of-sequence token."""
        return self._encode(target)[: self.max_target_length - 1] + [self.tokenizer.eos_token_id]

    def training_example(self, definition: str, input_text: str, target: str) -> dict[str, list[int]]:
        """Return input_ids, attention_mask and labels; labels are -100 on the prompt."""
        prompt = self.prompt_ids(definition, input_text)
        answer = self.target_ids(target)
        return {
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
        }


def tokenize_for_training(dataset: Dataset, prompt_tokenizer: PromptTokenizer) -> Dataset:
    """Add input_ids, attention_mask, labels and length columns; the target is the first reference."""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        example = prompt_tokenizer.training_example(row["definition"], row["input"], row["references"][0])
        example["length"] = len(example["input_ids"])
        return example

    return dataset.map(encode, desc="Tokenising")


@dataclass
class CausalLMCollator:
    """Pads input_ids, attention_mask and labels of a batch; other columns are dropped.

    ``padding_side`` "right" suits training, "left" suits generation.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = 8

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        with_labels = "labels" in features[0]
        if with_labels:
            batch["labels"] = []
        for feature in features:
            padding = longest - len(feature["input_ids"])
            columns = [("input_ids", self.pad_token_id), ("attention_mask", 0)]
            if with_labels:
                columns.append(("labels", IGNORE_INDEX))
            for key, pad_value in columns:
                values = list(feature[key])
                batch[key].append(values + [pad_value] * padding if self.padding_side == "right" else [pad_value] * padding + values)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
