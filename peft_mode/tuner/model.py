"""The MoDE tuner: finds the target layers of a model and wraps them in `MoDELinear`."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGET_MODULES, MoDEConfig
from .layer import MoDELayer, MoDELinear, token_routing_merge_error


class MoDEModel(BaseTuner):
    """Adds Mixture of Dyadic Experts (MoDE) adapters to a model.

    Created by `peft.get_peft_model` with a `MoDEConfig` once `peft_mode` is imported. The
    method is described in Ning et al., "MoDE: Effective Multi-task Parameter Efficient
    Fine-Tuning with a Mixture of Dyadic Experts", https://arxiv.org/abs/2408.01505.

    Args:
        model: the model to adapt.
        config: the `MoDEConfig`, or a dict of adapter name to config.
        adapter_name: name of the adapter, ``"default"`` unless given.
        low_cpu_mem_usage: create the adapter weights on the meta device, for loading.

    Raises:
        TypeError: a targeted module is neither `torch.nn.Linear` nor `Conv1D`.
        ValueError: no ``target_modules`` were given and the model type has no default.
    """

    prefix: str = "mode_"
    tuner_layer_cls = MoDELayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: MoDEConfig, model_config: dict) -> MoDEConfig:
        if peft_config.target_modules is not None:
            return peft_config
        model_type = model_config.get("model_type")
        defaults = self.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError(
                f"MoDEConfig.target_modules is not set and there is no default for model type {model_type!r}. "
                "Pass target_modules, for example ['q_proj', 'v_proj'] or 'all-linear'. Model types with "
                f"defaults: {sorted(self.target_module_mapping)}."
            )
        peft_config.target_modules = set(defaults)
        return peft_config

    def _create_and_replace(
        self,
        mode_config: MoDEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, MoDELayer):
            target.update_layer(adapter_name, mode_config, inference_mode=mode_config.inference_mode)
            return

        new_module = self._create_new_module(mode_config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            # An adapter added next to the active one is not trained until it is activated.
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        mode_config: MoDEConfig, adapter_name: str, target: nn.Module, module_path: str
    ) -> MoDELinear:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base_layer, nn.Linear):
            if mode_config.fan_in_fan_out:
                warnings.warn(
                    f"fan_in_fan_out=True but {module_path} is torch.nn.Linear, which stores (out, in); "
                    "using fan_in_fan_out=False."
                )
                mode_config.fan_in_fan_out = False
        elif isinstance(base_layer, Conv1D):
            if not mode_config.fan_in_fan_out:
                warnings.warn(
                    f"fan_in_fan_out=False but {module_path} is Conv1D, which stores (in, out); "
                    "using fan_in_fan_out=True."
                )
                mode_config.fan_in_fan_out = True
        else:
            raise TypeError(
                f"MoDE cannot adapt module '{module_path}' of type {type(base_layer).__module__}."
                f"{type(base_layer).__name__}. Supported types: torch.nn.Linear and "
                "transformers.pytorch_utils.Conv1D. Remove it from target_modules or add it to exclude_modules."
            )
        return MoDELinear(target, adapter_name, config=mode_config)

    def _check_mode_merge(self, adapter_names: Optional[list[str]]) -> None:
        """Raise before any weight changes if an adapter to merge is token-routed."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            config = self.peft_config.get(name)
            if config is None:
                raise ValueError(f"Adapter '{name}' not found; available adapters: {sorted(self.peft_config)}.")
            if config.num_experts > 1:
                raise token_routing_merge_error(name, config.num_experts)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge one-expert adapters into the base weights; token-routed adapters raise `MoDEMergeError`."""
        self._check_mode_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge one-expert adapters and return the base model; token-routed adapters raise `MoDEMergeError`.

        Use `unload()` to remove a token-routed adapter without merging it.
        """
        self._check_mode_merge(adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Pass ``adapter_names`` (one adapter name per sample, or ``"__base__"``) to every MoDE layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "adapter_names (one adapter per sample) works in eval mode only; call model.eval() first."
            )
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(
                f"adapter_names contains unknown adapters {unknown}; available: {sorted(self.peft_config)} "
                "and '__base__' for the base model."
            )

        def add_adapter_names(module, module_args, module_kwargs, names):
            module_kwargs["adapter_names"] = names
            return module_args, module_kwargs

        handles = [
            layer.register_forward_pre_hook(partial(add_adapter_names, names=adapter_names), with_kwargs=True)
            for _, layer in self.mode_layers()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def mode_layers(self) -> list[tuple[str, MoDELayer]]:
        """Return ``(module name, layer)`` for every MoDE layer of the model, in module order."""
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, MoDELayer)]

    @torch.no_grad()
    def routing_weights_of(self, layer_name: str, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(..., S, m)`` routing weights that adapter ``adapter_name`` of layer ``layer_name`` gives ``x``."""
        layer = self.model.get_submodule(layer_name)
        if not isinstance(layer, MoDELayer) or adapter_name not in layer.mode_router:
            raise ValueError(
                f"'{layer_name}' is not a MoDE layer with a router for adapter '{adapter_name}' (adapters with one "
                "expert have no router)."
            )
        router = layer.mode_router[adapter_name]
        logits = router(x.to(router.weight.dtype))
        slots = layer.r[adapter_name] // layer.expert_rank[adapter_name]
        return torch.softmax(logits.view(*x.shape[:-1], slots, layer.num_experts[adapter_name]), dim=-1)
