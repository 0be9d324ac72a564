"""MoDE adapter layers for `torch.nn.Linear` and GPT-2's `Conv1D`."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MoDEConfig
from .ops import mode_update

# Called as observer(layer, adapter_name, routing_weights) with (N, S, m) routing weights.
RoutingObserver = Callable[["MoDELayer", str, torch.Tensor], None]


class MoDEMergeError(ValueError):
    """Raised when a token-routed MoDE adapter is asked to merge into the base weight."""


def token_routing_merge_error(adapter_name: str, num_experts: int) -> MoDEMergeError:
    """Build the error for merging a token-routed adapter, with the reason and the alternatives."""
    return MoDEMergeError(
        f"Cannot merge MoDE adapter '{adapter_name}' with num_experts={num_experts}: its routing weights depend "
        "on each token's input, so the update is not a fixed matrix that can be added to the base weight. "
        "Keep the adapter unmerged for inference, or call `unload()` to get the base model back without it. "
        "Only adapters with num_experts=1 (plain LoRA) can be merged."
    )


def init_down_projection(weight: torch.Tensor) -> None:
    """Initialise a down-projection as LoRA initialises ``lora_A``.

    Kaiming-uniform with ``a = sqrt(5)``, the default of `nn.Linear`, which peft's LoRA
    keeps for ``lora_A`` (Hu et al., "LoRA", https://arxiv.org/abs/2106.09685).
    """
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_up_projections(weight: torch.Tensor, at_zero: bool) -> None:
    """Initialise the ``(m, Q, r)`` up-projections.

    Zero makes the adapter start as the identity, as LoRA does with ``lora_B``. Otherwise each
    expert is drawn like an `nn.Linear(r, Q)` weight, so the experts differ from the start.
    """
    if at_zero:
        nn.init.zeros_(weight)
        return
    for expert_weight in weight:
        nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))


class MoDELayer(BaseTunerLayer):
    """Per-adapter MoDE state of an adapted layer.

    For adapter ``name`` with P = in_features and Q = out_features:

    - ``mode_A[name]``: `nn.Linear(P, r)` (shared) or `nn.Linear(P, m * r)` (one per expert,
      rows ``i*r:(i+1)*r`` for expert i), no bias;
    - ``mode_B[name]``: parameter of shape ``(m, Q, r)``, each expert with the layout of a
      LoRA ``lora_B`` weight;
    - ``mode_router[name]``: `nn.Linear(P, S * m)`, no bias, output viewed as ``(S, m)``
      slot-major; absent when m = 1 because a softmax over one expert is constant.
    """

    # NOTE: generic peft code (delete_adapter, set_adapter, dtype casting, state dicts) finds the
    # per-adapter containers through these two tuples; update them when adding a container.
    adapter_layer_names = ("mode_A", "mode_B", "mode_router")
    other_param_names = (
        "r", "num_experts", "expert_rank", "share_down_projection", "scaling", "top_k", "mode_dropout"
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.expert_rank: dict[str, int] = {}
        self.share_down_projection: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.top_k: dict[str, Optional[int]] = {}
        self.mode_dropout = nn.ModuleDict({})
        self.mode_A = nn.ModuleDict({})
        self.mode_B = nn.ParameterDict({})
        self.mode_router = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.routing_observer: Optional[RoutingObserver] = None
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            weight = base_layer.weight
            self.in_features, self.out_features = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        else:
            raise TypeError(
                f"MoDE cannot adapt a layer of type {type(base_layer).__name__}; supported types are "
                "torch.nn.Linear and transformers.pytorch_utils.Conv1D."
            )

    def update_layer(self, adapter_name: str, config: MoDEConfig, inference_mode: bool = False) -> None:
        """Create, initialise and activate the parameters of adapter ``adapter_name``."""
        r, num_experts, expert_rank = config.r, config.num_experts, config.expert_rank
        if r % expert_rank != 0:
            raise ValueError(f"expert_rank={expert_rank} must divide r={r} (adapter '{adapter_name}').")
        slots = r // expert_rank
        self.r[adapter_name] = r
        self.num_experts[adapter_name] = num_experts
        self.expert_rank[adapter_name] = expert_rank
        self.share_down_projection[adapter_name] = config.share_down_projection
        self.scaling[adapter_name] = config.scaling
        self.top_k[adapter_name] = config.top_k
        self.mode_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        down_rows = r if config.share_down_projection or num_experts == 1 else num_experts * r
        self.mode_A[adapter_name] = nn.Linear(self.in_features, down_rows, bias=False)
        self.mode_B[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features, r))
        if num_experts > 1:
            self.mode_router[adapter_name] = nn.Linear(self.in_features, slots * num_experts, bias=False)

        self.reset_mode_parameters(adapter_name, config.init_weights, config.router_init_scale)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_mode_parameters(self, adapter_name: str, init_weights: bool, router_init_scale: float) -> None:
        """Initialise adapter ``adapter_name``: A as LoRA's A, B zero (or random), router small normal."""
        if adapter_name not in self.mode_A:
            return
        init_down_projection(self.mode_A[adapter_name].weight)
        init_up_projections(self.mode_B[adapter_name], at_zero=init_weights)
        if adapter_name in self.mode_router:
            # A router that starts random, not at zero, breaks the symmetry between experts.
            nn.init.normal_(self.mode_router[adapter_name].weight, mean=0.0, std=router_init_scale)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Return the ``(Q, P)`` weight update of a one-expert adapter (scaling included).

        Raises:
            MoDEMergeError: the adapter has more than one expert, so its update depends on the input.
        """
        if self.num_experts[adapter_name] > 1:
            raise token_routing_merge_error(adapter_name, self.num_experts[adapter_name])
        down_weight = self.mode_A[adapter_name].weight
        up_weight = self.mode_B[adapter_name][0]
        # Compute in float32 on CPU, where half-precision matmul is slow or missing.
        cast_to_float = down_weight.device.type == "cpu" and down_weight.dtype in (torch.float16, torch.bfloat16)
        if cast_to_float:
            delta = (up_weight.float() @ down_weight.float()).to(down_weight.dtype)
        else:
            delta = up_weight @ down_weight
        return delta * self.scaling[adapter_name]


class MoDELinear(nn.Module, MoDELayer):
    """MoDE around a linear layer: ``y = base(x) + sum_k sum_i R_{k,i}(x) x A_k B_{i,k}^T * alpha / r``.

    Wraps `torch.nn.Linear` or GPT-2's `Conv1D`; forward maps ``(..., P)`` to ``(..., Q)``.
    See `MoDELayer` for the parameters and `peft_mode.tuner.ops` for how the update is computed.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoDEConfig, **kwargs: Any) -> None:
        super().__init__()
        MoDELayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the updates of one-expert adapters to the base weight.

        Args:
            safe_merge: compute the merged weight on a copy and raise if it has non-finite values.
            adapter_names: adapters to merge; None merges the active ones.

        Raises:
            MoDEMergeError: an adapter to merge has more than one expert. Nothing is merged then.
            ValueError: ``safe_merge`` found non-finite values.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name in self.num_experts and self.num_experts[name] > 1:
                raise token_routing_merge_error(name, self.num_experts[name])

        base_layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.mode_A:
                continue
            delta = transpose(self.get_delta_weight(name), self.fan_in_fan_out)
            if safe_merge:
                merged_weight = base_layer.weight.data + delta.to(base_layer.weight.dtype)
                if not torch.isfinite(merged_weight).all():
                    raise ValueError(
                        f"Merging MoDE adapter '{name}' produces non-finite weights; the adapter is broken "
                        "(check its parameters for NaN or inf). The base weight was left unchanged."
                    )
                base_layer.weight.data = merged_weight
            else:
                base_layer.weight.data += delta.to(base_layer.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract all merged adapters from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mode_A:
                delta = transpose(self.get_delta_weight(name), self.fan_in_fan_out)
                base_layer.weight.data -= delta.to(base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Map ``(..., P)`` to ``(..., Q)``: the base layer's output plus every active adapter's update."""
        adapter_names = kwargs.pop("adapter_names", None)

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)

        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)

        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.mode_A:
                continue
            result = result + self._adapter_update(x, name)
        return result.to(result_dtype)

    def _adapter_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Compute one adapter's ``(..., Q)`` update in the adapter's dtype."""
        down = self.mode_A[adapter_name]
        x = self._cast_input_dtype(x, down.weight.dtype)
        router = self.mode_router[adapter_name] if adapter_name in self.mode_router else None
        update, routing_weights = mode_update(
            x,
            down.weight,
            router.weight if router is not None else None,
            self.mode_B[adapter_name],
            expert_rank=self.expert_rank[adapter_name],
            scaling=self.scaling[adapter_name],
            dropout=self.mode_dropout[adapter_name],
            top_k=self.top_k.get(adapter_name),
        )
        if self.routing_observer is not None and routing_weights is not None:
            self.routing_observer(self, adapter_name, routing_weights)
        return update

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Apply a different adapter to each sample; ``"__base__"`` selects no adapter.

        ``adapter_names`` has one entry per sample along the first dimension of ``x``.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples; pass "
                "one adapter name (or '__base__') per sample."
            )
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in set(adapter_names):
            if name not in self.mode_A:
                continue
            rows = [index for index, sample_adapter in enumerate(adapter_names) if sample_adapter == name]
            sub_batch = x[rows]
            result[rows] = result[rows] + self._adapter_update(sub_batch, name).to(result_dtype)
        return result

    def __repr__(self) -> str:
        return "mode." + super().__repr__()
