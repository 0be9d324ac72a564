"""Routing statistics of MoDE layers, accumulated on the device during forward passes.

For every MoDE layer (with a router) of one adapter, a `RouterStatsRecorder` sums over
non-padding tokens:

- the routing weights, per slot and expert: an (S, m) tensor;
- the routing entropy ``-sum_i R_i log R_i`` per slot, in nats;
- the number of tokens.

Summaries derived from these sums:

- ``expert_weights``: mean routing weight of each expert per slot (S, m); each row sums to 1;
- ``expert_load``: the same averaged over slots (m,), the share of routing mass per expert;
- ``entropy``: mean routing entropy per token and slot (0 = one expert takes all,
  log m = uniform);
- ``load_cv``: coefficient of variation (population standard deviation / mean) of
  ``expert_load``; 0 when all experts get the same mass.

Padding is excluded with the ``attention_mask`` passed to the model's forward. Collection
costs a few tensor operations per layer and no per-token Python work. Only the model's
own forward passes are counted: recomputation inside gradient checkpointing happens
outside them and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.layer import MoDELayer


@dataclass
class LayerRoutingSums:
    """Running sums of one layer."""

    weight_sum: torch.Tensor  # (S, m)
    entropy_sum: torch.Tensor  # (S,)
    token_count: torch.Tensor  # ()

    def reset(self) -> None:
        self.weight_sum.zero_()
        self.entropy_sum.zero_()
        self.token_count.zero_()


def short_layer_name(module_name: str) -> str:
    """Drop the wrapper prefixes of a module name: ``base_model.model.model.layers.3...`` -> ``layers.3...``."""
    for prefix in ("base_model.model.", "model.", "transformer."):
        module_name = module_name.removeprefix(prefix)
    return module_name


def summarise(sums: LayerRoutingSums) -> Optional[dict[str, Any]]:
    """Turn the sums of one layer into the figures listed in the module docstring (None if no tokens)."""
    count = float(sums.token_count)
    if count == 0:
        return None
    expert_weights = (sums.weight_sum.double() / count)
    expert_load = expert_weights.mean(dim=0)
    load_mean = expert_load.mean()
    load_cv = float(expert_load.std(unbiased=False) / load_mean) if load_mean > 0 else 0.0
    return {
        "expert_weights": expert_weights.tolist(),
        "expert_load": expert_load.tolist(),
        "entropy": float(sums.entropy_sum.double().sum() / (count * sums.entropy_sum.numel())),
        "load_cv": load_cv,
        "tokens": int(count),
    }


class RouterStatsRecorder:
    """Collects routing statistics of all routed MoDE layers of ``model`` for one adapter.

    Use `attach` before the forward passes to observe and `detach` after; `summary` returns
    the figures per layer and overall, `reset` clears the sums.

    Args:
        model: a model with MoDE layers (a `PeftModel` or the module it wraps).
        adapter_name: adapter to observe; None observes the first active adapter of each layer.
    """

    def __init__(self, model: nn.Module, adapter_name: Optional[str] = None):
        self.model = model
        self.adapter_name = adapter_name
        self.layers: dict[str, MoDELayer] = {}
        for name, module in model.named_modules():
            if isinstance(module, MoDELayer) and self._adapter_of(module) in module.mode_router:
                self.layers[short_layer_name(name)] = module
        self._names = {id(layer): name for name, layer in self.layers.items()}
        self.sums: dict[str, LayerRoutingSums] = {}
        self._attention_mask: Optional[torch.Tensor] = None
        self._in_forward = 0
        self._handles: list[Any] = []

    def _adapter_of(self, layer: MoDELayer) -> str:
        if self.adapter_name is not None:
            return self.adapter_name
        return layer.active_adapters[0] if layer.active_adapters else "default"

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "RouterStatsRecorder":
        """Start observing the routers of the model's forward passes."""
        if self.attached:
            return self
        for layer in self.layers.values():
            layer.routing_observer = self._observe
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))
        return self

    def detach(self) -> None:
        """Stop observing; the sums are kept."""
        for layer in self.layers.values():
            if layer.routing_observer == self._observe:
                layer.routing_observer = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._in_forward = 0

    def _before_forward(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._in_forward += 1

    def _after_forward(self, module, args, output):
        self._in_forward = max(0, self._in_forward - 1)

    def _token_mask(self, tokens: int) -> Optional[torch.Tensor]:
        mask = self._attention_mask
        if mask is None:
            return None
        batch, length = mask.shape
        if tokens == batch * length:
            return mask.reshape(-1)
        if tokens % batch == 0 and tokens // batch <= length:
            # Generation with a cache feeds only the newest positions, which are the last ones of the mask.
            return mask[:, length - tokens // batch :].reshape(-1)
        return None

    @torch.no_grad()
    def _observe(self, layer: MoDELayer, adapter_name: str, routing_weights: torch.Tensor) -> None:
        if not self._in_forward or adapter_name != self._adapter_of(layer):
            return
        name = self._names[id(layer)]
        weights = routing_weights.float()
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)  # (N, S)
        mask = self._token_mask(weights.shape[0])

        sums = self.sums.get(name)
        if sums is None:
            _, slots, experts = weights.shape
            sums = self.sums[name] = LayerRoutingSums(
                weight_sum=torch.zeros(slots, experts, device=weights.device),
                entropy_sum=torch.zeros(slots, device=weights.device),
                token_count=torch.zeros((), device=weights.device),
            )
        if mask is None:
            sums.weight_sum += weights.sum(dim=0)
            sums.entropy_sum += entropy.sum(dim=0)
            sums.token_count += weights.shape[0]
        else:
            mask = mask.to(weights.dtype)
            sums.weight_sum += torch.einsum("n,nsm->sm", mask, weights)
            sums.entropy_sum += mask @ entropy
            sums.token_count += mask.sum()

    def reset(self) -> None:
        """Clear the accumulated sums."""
        for sums in self.sums.values():
            sums.reset()

    def all_reduce(self) -> None:
        """Sum the statistics over all processes of an initialised `torch.distributed` group."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name in self.layers:
            sums = self.sums.get(name)
            if sums is None:
                continue
            for tensor in (sums.weight_sum, sums.entropy_sum, sums.token_count):
                torch.distributed.all_reduce(tensor)

    def summary(self) -> dict[str, Any]:
        """Return ``{"layers": {name: figures}, "overall": figures}``; see the module docstring.

        The overall figures average the per-layer figures over layers. Expert i of one
        layer is unrelated to expert i of another, so the overall expert load shows how
        even the routing is, not which shared expert is used.
        """
        layers = {name: summarise(self.sums[name]) for name in self.layers if name in self.sums}
        layers = {name: figures for name, figures in layers.items() if figures is not None}
        if not layers:
            return {"layers": {}, "overall": None}
        loads = [figures["expert_load"] for figures in layers.values()]
        same_width = len({len(load) for load in loads}) == 1
        overall = {
            "entropy": sum(f["entropy"] for f in layers.values()) / len(layers),
            "load_cv": sum(f["load_cv"] for f in layers.values()) / len(layers),
            "tokens": max(f["tokens"] for f in layers.values()),
        }
        if same_width:
            overall["expert_load"] = [sum(column) / len(loads) for column in zip(*loads)]
        return {"layers": layers, "overall": overall}


def flatten_for_logs(summary: dict[str, Any], detail: str = "layer", prefix: str = "router") -> dict[str, float]:
    """Turn a `RouterStatsRecorder.summary` into flat ``{key: float}`` log entries.

    Args:
        detail: ``"overall"`` logs only the overall figures, ``"layer"`` adds per-layer entropy,
            load CV and expert load, ``"slot"`` also adds each slot's expert weights.
    """
    if detail not in ("overall", "layer", "slot"):
        raise ValueError(f"detail must be 'overall', 'layer' or 'slot', got {detail!r}.")
    logs: dict[str, float] = {}
    overall = summary.get("overall")
    if overall is None:
        return logs
    logs[f"{prefix}/entropy"] = overall["entropy"]
    logs[f"{prefix}/load_cv"] = overall["load_cv"]
    for index, value in enumerate(overall.get("expert_load", [])):
        logs[f"{prefix}/expert_{index}"] = value
    if detail == "overall":
        return logs
    for name, figures in summary["layers"].items():
        logs[f"{prefix}/{name}/entropy"] = figures["entropy"]
        logs[f"{prefix}/{name}/load_cv"] = figures["load_cv"]
        for index, value in enumerate(figures["expert_load"]):
            logs[f"{prefix}/{name}/expert_{index}"] = value
        if detail == "slot":
            for slot, row in enumerate(figures["expert_weights"]):
                for index, value in enumerate(row):
                    logs[f"{prefix}/{name}/slot_{slot}/expert_{index}"] = value
    return logs
