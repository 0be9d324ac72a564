"""A `transformers.Trainer` that computes language-model logits only where the loss needs them.

In instruction tuning the prompt is masked out of the loss, so most positions need no
logits. Projecting every position onto a vocabulary of tens of thousands of tokens costs
a large share of a small model's compute (SmolLM2-135M: 576 x 49,152 per token, about a
fifth of a forward pass) and memory. `TargetLogitsTrainer` selects the hidden states of
the positions that predict a label before the output layer runs, through a forward
pre-hook on the model's output embeddings, and computes the same cross-entropy as
transformers' causal-LM loss on those rows only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..data.tokenization import IGNORE_INDEX


def next_token_positions(labels: torch.Tensor) -> torch.Tensor:
    """Return a (batch, length) bool mask of the positions whose next token has a label.

    Position t predicts token t + 1, so the mask is ``labels[:, 1:] != -100`` shifted left.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


@contextmanager
def logits_only_at(output_layer: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Make ``output_layer`` see only the hidden states at ``positions`` ((batch, length) bool).

    Inside the context the model returns logits of shape (1, K, vocab) for the K selected
    positions, in row-major order, instead of (batch, length, vocab).
    """

    def select_rows(module, args):
        hidden_states = args[0]
        return (hidden_states[positions].unsqueeze(0), *args[1:])

    handle = output_layer.register_forward_pre_hook(select_rows)
    try:
        yield
    finally:
        handle.remove()


def selected_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
    """Cross-entropy of logits computed by `logits_only_at` against the labels they predict.

    Matches transformers' causal-LM loss: float32 logits, summed and divided by
    ``num_items_in_batch`` when given (gradient accumulation), else averaged over tokens.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if logits.shape[0] != targets.shape[0]:
        raise RuntimeError(
            f"Got logits for {logits.shape[0]} positions but {targets.shape[0]} labelled tokens; the model's "
            "output layer did not run exactly once on the selected positions."
        )
    loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss / max(targets.numel(), 1)


class TargetLogitsTrainer(Trainer):
    """`transformers.Trainer` that computes logits only at positions with a label.

    Args:
        target_only_logits: False gives the plain Trainer behaviour.
        *args, **kwargs: passed to `transformers.Trainer`.
    """

    def __init__(self, *args: Any, target_only_logits: bool = True, **kwargs: Any):
        self.target_only_logits = target_only_logits
        if target_only_logits:
            if kwargs.get("compute_loss_func") is not None:
                raise ValueError("target_only_logits=True computes its own loss; do not pass compute_loss_func.")
            kwargs["compute_loss_func"] = selected_token_loss
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.target_only_logits or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        output_layer = self.accelerator.unwrap_model(model).get_output_embeddings()
        if output_layer is None:
            raise ValueError(
                "target_only_logits=True needs a model with output embeddings (an LM head); set it to False."
            )
        with logits_only_at(output_layer, next_token_positions(inputs["labels"])):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
