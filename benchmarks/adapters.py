"""The three adapter implementations the benchmarks compare, built on one frozen base layer.

- ``mode``: peft-mode's `MoDELinear` (fused matrix products, custom backward);
- ``lora``: peft's own LoRA `Linear` at the iso-parametric rank;
- ``loop``: the same MoDE math computed the way public mixture-of-LoRA code bases do it
  (HydraLoRA, MoLoRA ports): a Python loop over experts that forms each expert's full
  output and adds it with its routing weight;
- ``lora_plain``: peft's LoRA weights applied as two bare matrix products, without the
  dropout call and the (N, Q) scaling multiplication that peft's forward performs even
  when the scaling is 1. It shows how much of LoRA's time those two steps take.

`adapter_path` returns a function that computes only the update (the base layer's
product excluded); `whole_layer` returns one that runs the complete layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

import peft_mode  # noqa: F401
from peft_mode import MoDEConfig, MoDELinear
from peft_mode.budget import mode_parameter_count


@dataclass(frozen=True)
class LayerShape:
    in_features: int
    out_features: int
    r: int
    num_experts: int
    expert_rank: int
    shared: bool

    @property
    def mode_parameters(self) -> int:
        return mode_parameter_count(
            self.in_features, self.out_features, self.r, self.num_experts, self.expert_rank, self.shared
        )

    @property
    def lora_rank(self) -> int:
        """LoRA rank whose parameter count is closest to the MoDE layer's, router included."""
        return max(1, round(self.mode_parameters / (self.in_features + self.out_features)))


class LoopMoDE(nn.Module):
    """MoDE computed with a loop over experts, each expert's (N, Q) output formed in full."""

    def __init__(self, source: MoDELinear, adapter: str = "default"):
        super().__init__()
        self.base_layer = source.base_layer
        self.down = nn.Parameter(source.mode_A[adapter].weight.detach().clone())
        self.up = nn.Parameter(source.mode_B[adapter].detach().clone())
        self.router = nn.Parameter(source.mode_router[adapter].weight.detach().clone())
        self.num_experts = source.num_experts[adapter]
        self.expert_rank = source.expert_rank[adapter]
        self.shared = source.share_down_projection[adapter]
        self.rank = source.r[adapter]

    def update(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.rank // self.expert_rank
        logits = x @ self.router.t()
        routing = torch.softmax(logits.view(*x.shape[:-1], slots, self.num_experts), dim=-1)
        shared_projection = x @ self.down.t() if self.shared else None
        output = 0
        for expert in range(self.num_experts):
            if self.shared:
                projection = shared_projection
            else:
                projection = x @ self.down[expert * self.rank : (expert + 1) * self.rank].t()
            if slots == 1:
                # One slot (MoLoRA, MoLoRA-SD): weight the expert's full output, as those code bases do.
                output = output + routing[..., 0, expert : expert + 1] * (projection @ self.up[expert].t())
            else:
                # Several slots: each slot's columns of the projection get that slot's weight.
                gate = routing[..., expert].repeat_interleave(self.expert_rank, dim=-1)
                output = output + (projection * gate) @ self.up[expert].t()
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.update(x)


def build_layers(shape: LayerShape, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict[str, nn.Module]:
    """Create the three implementations around copies of one frozen base layer, with random adapters."""
    torch.manual_seed(seed)
    base = nn.Linear(shape.in_features, shape.out_features, bias=False).to(device, dtype).requires_grad_(False)
    config = MoDEConfig(
        r=shape.r,
        num_experts=shape.num_experts,
        expert_rank=shape.expert_rank,
        share_down_projection=shape.shared,
        init_weights=False,
        router_init_scale=0.02,
    )
    mode = MoDELinear(base, "default", config).to(device, dtype)
    lora_config = LoraConfig(r=shape.lora_rank, lora_alpha=shape.lora_rank, init_lora_weights=False)
    lora = LoraLinear(base, "default", r=shape.lora_rank, lora_alpha=shape.lora_rank, config=lora_config)
    lora = lora.to(device, dtype)
    loop = LoopMoDE(mode).to(device, dtype)
    return {"mode": mode, "lora": lora, "loop": loop, "lora_plain": lora}


def adapter_path(name: str, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function that computes only the adapter's update of ``layer`` for an input."""
    if name == "mode":
        return lambda x: layer._adapter_update(x, "default")
    if name == "lora":
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        dropout, scaling = layer.lora_dropout["default"], layer.scaling["default"]
        return lambda x: lora_b(lora_a(dropout(x))) * scaling
    if name == "lora_plain":
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        return lambda x: lora_b(lora_a(x))
    if name == "loop":
        return layer.update
    raise ValueError(f"Unknown implementation {name!r}.")


def whole_layer(name: str, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the complete layer (base product plus update)."""
    return layer
