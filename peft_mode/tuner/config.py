"""Configuration of a Mixture of Dyadic Experts (MoDE) adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .peft_type import MODE_PEFT_TYPE

# Attention projections per architecture. MoDE was evaluated on the attention
# projections (q, k, v and o), so these defaults adapt all four where the model
# names them separately. GPT-2 style models fuse q, k and v into one Conv1D.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "olmo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value", "dense"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MoDEConfig(PeftConfig):
    """Configuration of a [`MoDEModel`] adapter.

    MoDE adds to a frozen linear layer ``y = x W0`` the token-routed update
    ``sum_k sum_i R_{k,i}(x) x A_k B_{i,k}^T``: one down-projection ``A`` shared by
    all experts, ``num_experts`` up-projections ``B_i``, and one softmax router per
    group of ``expert_rank`` rank-one components (a "slot"). Source: Ning et al.,
    "MoDE: Effective Multi-task Parameter Efficient Fine-Tuning with a Mixture of
    Dyadic Experts", Findings of NAACL 2025, https://arxiv.org/abs/2408.01505.

    Args:
        r (`int`): Rank of the adapter, the width of the shared down-projection. Default 8.
        num_experts (`int`): Number of experts m. With 1 the adapter is exactly LoRA of
            rank ``r`` and has no router. Default 4.
        expert_rank (`int`): Expert rank p, the number of rank-one components routed
            together; it must divide ``r``. 1 is the dyadic case, ``r`` gives MoLoRA-SD.
            Default 1.
        share_down_projection (`bool`): Share one down-projection across experts (MoDE,
            MoLoRA-SD). False gives every expert its own down-projection, which with
            ``expert_rank == r`` is MoLoRA. Default True.
        alpha (`float`, *optional*): The update is scaled by ``alpha / r``. None, the
            default, means ``alpha = r``, so the update is unscaled as in the paper.
        dropout (`float`): Dropout probability on the input of the down-projection. The
            router always gets the input without dropout. Default 0.0.
        target_modules (`list[str]` or `str`, *optional*): Module names (suffix match) or a
            regular expression (full match) of the layers to adapt, or ``"all-linear"``.
            None picks the attention projections of known architectures
            (`DEFAULT_TARGET_MODULES`).
        exclude_modules (`list[str]` or `str`, *optional*): Module names or a regular
            expression of layers not to adapt.
        layers_to_transform (`list[int]` or `int`, *optional*): Only adapt the layers
            with these indices.
        layers_pattern (`list[str]` or `str`, *optional*): Name of the `nn.ModuleList`
            that ``layers_to_transform`` indexes, for example ``"layers"`` or ``"h"``.
        modules_to_save (`list[str]`, *optional*): Modules besides the MoDE layers that
            are trained fully and saved with the adapter, for example a new classifier.
        fan_in_fan_out (`bool`): True when the adapted layer stores its weight as
            ``(in_features, out_features)``, as GPT-2's Conv1D does. It is set for Conv1D
            layers automatically. Default False.
        init_weights (`bool`): True (default) starts the up-projections at zero, so a new
            adapter leaves the model unchanged. False draws them at random, which tests
            use to see the adapter act.
        router_init_scale (`float`): Standard deviation of the normal distribution the
            router weights are drawn from. It must be positive when ``init_weights`` is
            True and there is more than one expert, because a zero router with zero
            up-projections gives every expert the same gradient forever. Default 0.01.
        top_k (`int`, *optional*): Keep only the ``top_k`` experts with the largest routing
            weights in each slot of each token, with their weights renormalised to sum to 1
            (a softmax over the selected experts). None, the default, keeps all experts:
            the soft routing of the MoDE paper, which lists top-k routing as future work.

    Raises:
        ValueError: a field is outside its allowed range; the message names the field,
            the value and the range.
    """

    r: int = field(default=8, metadata={"help": "Rank of the adapter (width of the shared down-projection)."})
    num_experts: int = field(
        default=4,
        metadata={"help": "Number of experts m. 1 gives LoRA of rank r without a router."},
    )
    expert_rank: int = field(
        default=1,
        metadata={
            "help": (
                "Expert rank p: rank-one components routed together. Must divide r. 1 is the dyadic case and "
                "r gives MoLoRA-SD."
            )
        },
    )
    share_down_projection: bool = field(
        default=True,
        metadata={
            "help": (
                "Share one down-projection across the experts. False gives one down-projection per expert "
                "(MoLoRA when expert_rank == r)."
            )
        },
    )
    alpha: Optional[float] = field(
        default=None,
        metadata={"help": "The update is scaled by alpha / r. None means alpha = r, i.e. unscaled."},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability on the input of the down-projection (not of the router)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names (suffix match) or a regular expression (full match) of the layers to adapt, or "
                "'all-linear'. None uses the attention projections of known architectures."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regular expression of layers not to adapt."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices in the model's layer list."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList that layers_to_transform indexes, for example 'layers' or 'h'."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the MoDE layers that are trained fully and saved with the adapter."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": (
                "True when the adapted layer stores its weight as (in_features, out_features), as GPT-2's "
                "Conv1D does. Set automatically for Conv1D."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True starts the up-projections at zero (the adapter starts as the identity). False draws them "
                "at random."
            )
        },
    )
    router_init_scale: float = field(
        default=0.01,
        metadata={"help": "Standard deviation of the normal distribution of the initial router weights."},
    )

    top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Keep only this many experts (largest routing weights) per slot and token, renormalised. "
                "None keeps all experts (soft routing)."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MODE_PEFT_TYPE
        self._validate_sizes()
        self._validate_scalars()
        self._validate_targets()

    def _validate_sizes(self) -> None:
        for name in ("r", "num_experts", "expert_rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MoDEConfig.{name} must be a positive integer, got {value!r}.")
        if self.r % self.expert_rank != 0:
            divisors = [d for d in range(1, self.r + 1) if self.r % d == 0]
            raise ValueError(
                f"MoDEConfig.expert_rank must divide r={self.r}, got expert_rank={self.expert_rank}. "
                f"Allowed values for this r: {divisors}."
            )

    def _validate_scalars(self) -> None:
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise ValueError(f"MoDEConfig.alpha must be a positive number or None (meaning alpha = r), got {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoDEConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.router_init_scale, bool) or not self.router_init_scale >= 0.0:
            raise ValueError(f"MoDEConfig.router_init_scale must be >= 0, got {self.router_init_scale!r}.")
        if self.router_init_scale == 0.0 and self.init_weights and self.num_experts > 1:
            raise ValueError(
                "MoDEConfig.router_init_scale must be > 0 when init_weights=True and num_experts > 1, got 0.0: "
                "with a zero router and zero up-projections every expert receives the same gradient, so the "
                "experts never differ. Use a small positive value such as 0.01."
            )
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts):
            raise ValueError(
                f"MoDEConfig.top_k must be None or an integer from 1 to num_experts={self.num_experts}, "
                f"got {self.top_k!r}."
            )
        for name in ("share_down_projection", "fan_in_fan_out", "init_weights"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"MoDEConfig.{name} must be True or False, got {value!r}.")

    def _validate_targets(self) -> None:
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "MoDEConfig.layers_to_transform cannot be combined with a regular expression in target_modules "
                f"({self.target_modules!r}); put the layer indices into the expression or pass a list of names."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                "MoDEConfig.layers_pattern cannot be combined with a regular expression in target_modules "
                f"({self.target_modules!r}); pass a list of module names instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"MoDEConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform: say which layer "
                "indices to adapt."
            )
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if not isinstance(layers, list) else layers
            if not all(_is_int(index) and index >= 0 for index in indices):
                raise ValueError(
                    f"MoDEConfig.layers_to_transform must be a non-negative integer or a list of them, got {layers!r}."
                )

    @property
    def scaling(self) -> float:
        """Factor ``alpha / r`` applied to the update (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.r

    @property
    def num_slots(self) -> int:
        """Number of routing slots S = r / expert_rank."""
        return self.r // self.expert_rank
