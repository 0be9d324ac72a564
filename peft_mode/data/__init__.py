"""Data loading: Super-NaturalInstructions tasks, prompts and batching."""

from .sni import SNIDataError, SNIInstance, SNISplits, available_tasks, load_sni_splits, load_task
from .tokenization import IGNORE_INDEX, CausalLMCollator, PromptTokenizer, tokenize_for_training

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "PromptTokenizer",
    "SNIDataError",
    "SNIInstance",
    "SNISplits",
    "available_tasks",
    "load_sni_splits",
    "load_task",
    "tokenize_for_training",
]
