"""The MoDE layer computes exactly the formula: against a plain loop, peft's LoRA and hand-written MoLoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from mode_reference import reference_update
from peft_mode import MoDEConfig, MoDELinear
from peft_mode.tuner.ops import mode_update, mode_update_autograd

IN_FEATURES, OUT_FEATURES = 12, 10

# (r, num_experts, expert_rank, share_down_projection)
SETTINGS = [
    (4, 3, 1, True),
    (4, 2, 2, True),
    (6, 4, 3, True),
    (8, 5, 8, True),
    (4, 3, 1, False),
    (6, 2, 2, False),
    (4, 4, 4, False),
    (4, 1, 1, True),
    (4, 1, 2, False),
]


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "linear":
        return nn.Linear(IN_FEATURES, OUT_FEATURES)
    layer = Conv1D(OUT_FEATURES, IN_FEATURES)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


def make_layer(kind: str, r: int, m: int, p: int, shared: bool, alpha=None, seed: int = 0) -> MoDELinear:
    torch.manual_seed(seed)
    config = MoDEConfig(
        r=r,
        num_experts=m,
        expert_rank=p,
        share_down_projection=shared,
        alpha=alpha,
        init_weights=False,
        router_init_scale=0.7,
        fan_in_fan_out=(kind == "conv1d"),
    )
    return MoDELinear(make_base(kind), "default", config)


def base_output(layer: MoDELinear, x: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, Conv1D):
        return x.double() @ base.weight.double() + base.bias.double()
    return x.double() @ base.weight.double().t() + base.bias.double()


def reference_of(layer: MoDELinear, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    router = layer.mode_router[adapter].weight if adapter in layer.mode_router else None
    return reference_update(
        x,
        layer.mode_A[adapter].weight.detach(),
        None if router is None else router.detach(),
        layer.mode_B[adapter].detach(),
        layer.expert_rank[adapter],
        layer.share_down_projection[adapter] or layer.num_experts[adapter] == 1,
        layer.scaling[adapter],
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("r,m,p,shared", SETTINGS)
def test_forward_matches_plain_loop(kind, r, m, p, shared):
    layer = make_layer(kind, r, m, p, shared)
    x = torch.randn(2, 5, IN_FEATURES, generator=torch.Generator().manual_seed(3))

    output = layer(x)

    expected = base_output(layer, x) + reference_of(layer, x)
    assert output.shape == (2, 5, OUT_FEATURES)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,m,p,shared", SETTINGS)
def test_alpha_scales_update(r, m, p, shared):
    layer = make_layer("linear", r, m, p, shared, alpha=3.0 * r)
    x = torch.randn(7, IN_FEATURES, generator=torch.Generator().manual_seed(4))

    update = layer(x).double() - base_output(layer, x)

    assert layer.scaling["default"] == pytest.approx(3.0)
    torch.testing.assert_close(update, reference_of(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(IN_FEATURES,), (4, IN_FEATURES), (2, 3, 4, IN_FEATURES)])
def test_any_leading_shape(shape):
    layer = make_layer("linear", 4, 3, 2, True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))

    output = layer(x)

    assert output.shape == (*shape[:-1], OUT_FEATURES)
    torch.testing.assert_close(output.double(), base_output(layer, x) + reference_of(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,m,p,shared", [s for s in SETTINGS if s[1] > 1])
def test_fused_gradients_match_autograd(r, m, p, shared):
    """The hand-written backward equals autograd through the plain operations, in float64."""
    torch.manual_seed(11)
    slots = r // p
    down_rows = r if shared else m * r
    tensors = {
        "x": torch.randn(9, IN_FEATURES, dtype=torch.float64),
        "down": torch.randn(down_rows, IN_FEATURES, dtype=torch.float64),
        "router": torch.randn(slots * m, IN_FEATURES, dtype=torch.float64),
        "up": torch.randn(m, OUT_FEATURES, r, dtype=torch.float64),
    }
    grad_output = torch.randn(9, OUT_FEATURES, dtype=torch.float64)

    fused_inputs = {name: value.clone().requires_grad_() for name, value in tensors.items()}
    fused, _ = mode_update(
        fused_inputs["x"], fused_inputs["down"], fused_inputs["router"], fused_inputs["up"], p, scaling=1.5
    )
    fused.backward(grad_output)

    plain_inputs = {name: value.clone().requires_grad_() for name, value in tensors.items()}
    plain, _ = mode_update_autograd(
        plain_inputs["x"], plain_inputs["down"], plain_inputs["router"], plain_inputs["up"], p, scaling=1.5
    )
    plain.backward(grad_output)

    torch.testing.assert_close(fused, plain)
    for name in tensors:
        torch.testing.assert_close(fused_inputs[name].grad, plain_inputs[name].grad, msg=f"gradient of {name}")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
def test_fused_backward_passes_gradcheck(shared):
    torch.manual_seed(12)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    down = torch.randn(4 if shared else 3 * 4, 5, dtype=torch.float64, requires_grad=True)
    router = torch.randn(2 * 3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)

    def update(*inputs):
        return mode_update(*inputs, expert_rank=2, scaling=0.5)[0]

    assert torch.autograd.gradcheck(update, (x, down, router, up))


@pytest.mark.parametrize("p,shared,expected_columns", [(1, True, 4 + 4 * 3), (2, True, 4 + 2 * 3), (1, False, 3 * 4),
                                                       (2, False, 3 * 4)])
def test_fused_update_saves_one_activation(p, shared, expected_columns):
    """Besides the input and the weights, autograd keeps h (and the routing weights when shared) only."""
    r, m, tokens = 4, 3, 7
    x = torch.randn(tokens, IN_FEATURES, requires_grad=True)
    down = torch.randn(r if shared else m * r, IN_FEATURES, requires_grad=True)
    router = torch.randn((r // p) * m, IN_FEATURES, requires_grad=True)
    up = torch.randn(m, OUT_FEATURES, r, requires_grad=True)
    known = {tensor.data_ptr() for tensor in (x, down, router, up)}
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        update, _ = mode_update(x, down, router, up, p)

    activations = [tensor for tensor in saved if tensor.data_ptr() not in known]
    assert len(activations) == 1
    assert activations[0].shape == (tokens, expected_columns)
    update.sum().backward()
    assert x.grad is not None


def test_one_expert_equals_peft_lora():
    """num_experts = 1 is LoRA: same output as peft's own LoRA with the same A and B."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, OUT_FEATURES))
    lora_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    )
    mode_model = get_peft_model(
        copy.deepcopy(base),
        MoDEConfig(r=4, num_experts=1, alpha=8, target_modules=["0", "2"], init_weights=False),
    )
    with torch.no_grad():
        for index in ("0", "2"):
            lora_layer = lora_model.base_model.model.get_submodule(index)
            mode_layer = mode_model.base_model.model.get_submodule(index)
            mode_layer.mode_A["default"].weight.copy_(lora_layer.lora_A["default"].weight)
            mode_layer.mode_B["default"][0].copy_(lora_layer.lora_B["default"].weight)
    x = torch.randn(6, IN_FEATURES)

    torch.testing.assert_close(mode_model(x), lora_model(x), rtol=0, atol=1e-6)
    assert len(mode_model.base_model.model.get_submodule("0").mode_router) == 0


class HandWrittenMoLoRA(nn.Module):
    """MoLoRA (separate A_i) or MoLoRA-SD (one shared A), written directly from their definitions."""

    def __init__(self, base, down_weights, up_weights, router_weight):
        super().__init__()
        self.base = base
        self.down_weights = down_weights  # list of (r, P), one per expert or one shared
        self.up_weights = up_weights  # list of (Q, r)
        self.router_weight = router_weight  # (m, P)

    def forward(self, x):
        routing = torch.softmax(x @ self.router_weight.t(), dim=-1)
        output = self.base(x)
        for i, up in enumerate(self.up_weights):
            down = self.down_weights[i if len(self.down_weights) > 1 else 0]
            output = output + routing[..., i : i + 1] * ((x @ down.t()) @ up.t())
        return output


@pytest.mark.parametrize("shared", [True, False], ids=["molora_sd", "molora"])
def test_expert_rank_r_equals_molora(shared):
    """p = r leaves one slot: MoDE is MoLoRA-SD (shared A) or MoLoRA (one A per expert)."""
    r, m = 4, 3
    layer = make_layer("linear", r, m, r, shared)
    down = layer.mode_A["default"].weight.detach()
    downs = [down] if shared else [down[i * r : (i + 1) * r] for i in range(m)]
    ups = [layer.mode_B["default"][i].detach() for i in range(m)]
    reference = HandWrittenMoLoRA(layer.get_base_layer(), downs, ups, layer.mode_router["default"].weight.detach())
    x = torch.randn(5, IN_FEATURES)

    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)


def test_input_dtype_restored():
    layer = make_layer("linear", 4, 2, 1, True).to(torch.bfloat16)
    x = torch.randn(3, IN_FEATURES, dtype=torch.bfloat16)

    assert layer(x).dtype == torch.bfloat16


def test_two_active_adapters_are_summed():
    layer = make_layer("linear", 4, 3, 1, True)
    torch.manual_seed(5)
    second = MoDEConfig(r=6, num_experts=2, expert_rank=3, init_weights=False, router_init_scale=0.5)
    layer.update_layer("second", second)
    layer.set_adapter(["default", "second"])
    x = torch.randn(4, IN_FEATURES)

    expected = base_output(layer, x) + reference_of(layer, x, "default") + reference_of(layer, x, "second")

    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_disabled_adapter_returns_base_output():
    layer = make_layer("linear", 4, 3, 1, True)
    x = torch.randn(4, IN_FEATURES)
    layer.enable_adapters(False)

    torch.testing.assert_close(layer(x), layer.get_base_layer()(x))


def test_fresh_adapter_is_identity():
    torch.manual_seed(0)
    base = make_base("linear")
    layer = MoDELinear(base, "default", MoDEConfig(r=4, num_experts=3))
    x = torch.randn(4, IN_FEATURES)

    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.mode_router["default"].weight.abs().sum() > 0
    assert layer.mode_router["default"].weight.std().item() == pytest.approx(0.01, rel=0.5)


def test_routing_weights_sum_to_one():
    layer = make_layer("linear", 6, 4, 2, True)
    x = torch.randn(2, 5, IN_FEATURES)
    seen = []
    layer.routing_observer = lambda module, adapter, weights: seen.append(weights)

    layer(x)

    assert seen[0].shape == (10, 3, 4)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(10, 3))


TOP_K_SETTINGS = [(4, 4, 1, True, 1), (4, 4, 1, True, 2), (6, 3, 3, True, 2), (4, 3, 2, False, 1), (4, 4, 4, False, 3)]


@pytest.mark.parametrize("r,m,p,shared,top_k", TOP_K_SETTINGS)
def test_top_k_forward_matches_plain_loop(r, m, p, shared, top_k):
    torch.manual_seed(0)
    config = MoDEConfig(r=r, num_experts=m, expert_rank=p, share_down_projection=shared, init_weights=False,
                        router_init_scale=0.7, top_k=top_k)
    layer = MoDELinear(make_base("linear"), "default", config)
    x = torch.randn(2, 5, IN_FEATURES, generator=torch.Generator().manual_seed(3))
    seen = []
    layer.routing_observer = lambda module, adapter, weights: seen.append(weights)

    output = layer(x)

    router = layer.mode_router["default"].weight.detach()
    expected = base_output(layer, x) + reference_update(
        x, layer.mode_A["default"].weight.detach(), router, layer.mode_B["default"].detach(), p, shared, 1.0, top_k
    )
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    assert ((seen[0] > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(10, r // p))


@pytest.mark.parametrize("r,m,p,shared,top_k", TOP_K_SETTINGS)
def test_top_k_fused_gradients_match_autograd(r, m, p, shared, top_k):
    torch.manual_seed(21)
    tensors = {
        "x": torch.randn(9, IN_FEATURES, dtype=torch.float64),
        "down": torch.randn(r if shared else m * r, IN_FEATURES, dtype=torch.float64),
        "router": torch.randn((r // p) * m, IN_FEATURES, dtype=torch.float64),
        "up": torch.randn(m, OUT_FEATURES, r, dtype=torch.float64),
    }
    grad_output = torch.randn(9, OUT_FEATURES, dtype=torch.float64)
    results = {}
    for name, function in (("fused", mode_update), ("plain", mode_update_autograd)):
        inputs = {key: value.clone().requires_grad_() for key, value in tensors.items()}
        output, _ = function(inputs["x"], inputs["down"], inputs["router"], inputs["up"], p, 1.0, None, top_k)
        output.backward(grad_output)
        results[name] = (output, {key: value.grad for key, value in inputs.items()})

    torch.testing.assert_close(results["fused"][0], results["plain"][0])
    for key in tensors:
        torch.testing.assert_close(results["fused"][1][key], results["plain"][1][key], msg=f"gradient of {key}")


def test_top_k_equal_to_num_experts_is_soft_routing():
    x = torch.randn(6, IN_FEATURES)
    soft = make_layer("linear", 4, 3, 1, True)
    full_top_k = make_layer("linear", 4, 3, 1, True)
    full_top_k.top_k["default"] = 3

    torch.testing.assert_close(full_top_k(x), soft(x))
