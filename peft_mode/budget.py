"""Parameter counts of LoRA, MoLoRA, MoLoRA-SD and MoDE, and configs that match a budget.

Per adapted matrix with P = in_features and Q = out_features, router included:

| method          | parameters                        |
| --------------- | --------------------------------- |
| LoRA r          | r*P + r*Q                         |
| MoLoRA m x r    | m*r*P + m*r*Q + m*P               |
| MoLoRA-SD m x r | r*P + m*r*Q + m*P                 |
| MoDE m x r x p  | r*P + m*r*Q + (r/p)*m*P           |

A MoDE adapter with one expert has no router (its routing weight is the constant 1),
so it counts as LoRA of rank r.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

METHODS = ("lora", "molora", "molora_sd", "mode")


def mode_parameter_count(
    in_features: int,
    out_features: int,
    r: int,
    num_experts: int = 1,
    expert_rank: Optional[int] = None,
    share_down_projection: bool = True,
) -> int:
    """Return the trainable parameters of one MoDE-family adapter on a P x Q layer.

    ``expert_rank`` None means r (one slot, MoLoRA-SD or MoLoRA). With one expert there is
    no router and the count is LoRA's.
    """
    expert_rank = r if expert_rank is None else expert_rank
    if r % expert_rank != 0:
        raise ValueError(f"expert_rank={expert_rank} must divide r={r}.")
    down_rows = r if share_down_projection or num_experts == 1 else num_experts * r
    router_rows = 0 if num_experts == 1 else (r // expert_rank) * num_experts
    return down_rows * in_features + num_experts * r * out_features + router_rows * in_features


def method_parameter_count(method: str, in_features: int, out_features: int, r: int, num_experts: int = 1,
                           expert_rank: Optional[int] = None, share_down_projection: bool = True) -> int:
    """Return the parameters of ``method`` (one of `METHODS`) on a P x Q layer.

    ``share_down_projection`` applies to mode only, because the other methods fix it.
    """
    if method == "lora":
        return r * (in_features + out_features)
    if method == "molora":
        return mode_parameter_count(in_features, out_features, r, num_experts, r, share_down_projection=False)
    if method == "molora_sd":
        return mode_parameter_count(in_features, out_features, r, num_experts, r, share_down_projection=True)
    if method == "mode":
        return mode_parameter_count(in_features, out_features, r, num_experts, expert_rank, share_down_projection)
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def layer_shapes(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, int, int]]:
    """Return ``(name, in_features, out_features)`` of each Linear or Conv1D whose name ends with a target."""
    targets = tuple(target_modules)
    shapes = []
    for name, module in model.named_modules():
        if not any(name == target or name.endswith("." + target) for target in targets):
            continue
        if isinstance(module, nn.Linear):
            shapes.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            shapes.append((name, in_features, out_features))
    if not shapes:
        raise ValueError(f"No Linear or Conv1D module of the model matches target_modules={list(targets)}.")
    return shapes


def total_parameter_count(shapes: Iterable[tuple[str, int, int]], method: str, r: int, num_experts: int = 1,
                          expert_rank: Optional[int] = None, share_down_projection: bool = True) -> int:
    """Return ``method``'s parameters summed over the layer shapes from `layer_shapes`."""
    return sum(
        method_parameter_count(method, p, q, r, num_experts, expert_rank, share_down_projection) for _, p, q in shapes
    )


@dataclass(frozen=True)
class MethodSpec:
    """Adapter configuration proposed for a budget, with its parameter count."""

    method: str
    r: int
    num_experts: int = 1
    expert_rank: Optional[int] = None
    parameters: int = 0
    label: str = field(default="", compare=False)

    def describe(self) -> str:
        """Return a short label such as ``mode 6x4x2`` or ``lora r=60``."""
        if self.method == "lora":
            return f"lora r={self.r}"
        if self.method == "mode":
            return f"mode {self.num_experts}x{self.r}x{self.expert_rank}"
        return f"{self.method} {self.num_experts}x{self.r}"


def propose_matching_configs(
    shapes: list[tuple[str, int, int]],
    budget: int,
    tolerance: float = 0.05,
    ranks: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    max_experts: int = 32,
) -> dict[str, list[MethodSpec]]:
    """Propose, for each method, the configurations whose parameter count is within ``tolerance`` of ``budget``.

    LoRA's rank is chosen freely (1 to 1024). MoLoRA and MoLoRA-SD use expert rank r and vary the
    number of experts; MoDE varies experts and every expert rank p < r that divides r. Each list is
    sorted by distance to the budget, closest first.

    Args:
        shapes: adapted layers from `layer_shapes`.
        budget: target number of trainable parameters.
        tolerance: allowed relative distance, 0.05 for 5 %.
        ranks: candidate ranks r for the mixture methods.
        max_experts: largest number of experts tried.
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got {budget}.")

    def close(count: int) -> bool:
        return abs(count - budget) <= tolerance * budget

    proposals: dict[str, list[MethodSpec]] = {method: [] for method in METHODS}
    for r in range(1, 1025):
        count = total_parameter_count(shapes, "lora", r)
        if close(count):
            proposals["lora"].append(MethodSpec("lora", r, 1, r, count))
    for r in ranks:
        for num_experts in range(2, max_experts + 1):
            for method in ("molora", "molora_sd"):
                count = total_parameter_count(shapes, method, r, num_experts, r)
                if close(count):
                    proposals[method].append(MethodSpec(method, r, num_experts, r, count))
            # p = r is MoLoRA-SD, listed above, so MoDE proposals keep p < r.
            for expert_rank in [d for d in range(1, r) if r % d == 0]:
                count = total_parameter_count(shapes, "mode", r, num_experts, expert_rank)
                if close(count):
                    proposals["mode"].append(MethodSpec("mode", r, num_experts, expert_rank, count))
    for method in METHODS:
        proposals[method].sort(key=lambda spec: (abs(spec.parameters - budget), spec.r, spec.num_experts))
    return proposals
