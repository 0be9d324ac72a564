"""The generic behaviour peft expects of every tuner, checked for MoDE on toy models.

One table of cases (toy model, config kwargs) drives shared checks: adapter names, training
touches only adapter parameters, save/load variants, disable/enable, set/delete adapters,
unload, merge rules, dtype handling, modules_to_save and mixed-adapter batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import make_tiny_llama
from peft_mode import MoDEConfig, MoDELayer, MoDEMergeError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, x):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


class EmbConv1D(nn.Module):
    """GPT-2 style: an embedding followed by a transformers Conv1D."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(8, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(16, 2)

    def forward(self, x):
        return self.lin0(self.flat(self.relu(self.conv1d(self.emb(x)))))


class TinyLlamaLogits(nn.Module):
    """Tiny Llama whose forward returns the logits tensor, so the checks can treat all models alike."""

    def __init__(self):
        super().__init__()
        self.lm = make_tiny_llama()

    def forward(self, x):
        return self.lm(input_ids=x).logits


def mlp_inputs():
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(0))


def token_inputs():
    return torch.randint(0, 60, (6, 2), generator=torch.Generator().manual_seed(0))


def llama_inputs():
    return torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


# name, model factory, input factory, MoDEConfig kwargs
CASES = [
    ("mlp dyadic", MLP, mlp_inputs, dict(target_modules=["lin0", "lin1"], r=4, num_experts=3)),
    ("mlp p=2", MLP, mlp_inputs, dict(target_modules=["lin0"], r=4, num_experts=2, expert_rank=2)),
    ("mlp molora-sd", MLP, mlp_inputs, dict(target_modules=["lin1"], r=4, num_experts=4, expert_rank=4)),
    (
        "mlp molora",
        MLP,
        mlp_inputs,
        dict(target_modules=["lin0", "lin1"], r=2, num_experts=3, expert_rank=2, share_down_projection=False),
    ),
    ("mlp lora", MLP, mlp_inputs, dict(target_modules=["lin0", "lin1"], r=4, num_experts=1)),
    ("mlp alpha", MLP, mlp_inputs, dict(target_modules=["lin0"], r=4, num_experts=2, alpha=16)),
    ("mlp dropout", MLP, mlp_inputs, dict(target_modules=["lin0", "lin1"], r=4, num_experts=2, dropout=0.1)),
    (
        "mlp modules_to_save",
        MLP,
        mlp_inputs,
        dict(target_modules=["lin0"], r=4, num_experts=2, modules_to_save=["head"]),
    ),
    ("mlp regex", MLP, mlp_inputs, dict(target_modules=r"lin[01]", r=4, num_experts=2)),
    ("mlp top-2", MLP, mlp_inputs, dict(target_modules=["lin0", "lin1"], r=4, num_experts=4, top_k=2)),
    ("mlp all-linear", MLP, mlp_inputs, dict(target_modules="all-linear", r=2, num_experts=2)),
    ("conv1d", EmbConv1D, token_inputs, dict(target_modules=["conv1d"], r=2, num_experts=3)),
    ("conv1d lora", EmbConv1D, token_inputs, dict(target_modules=["conv1d"], r=2, num_experts=1)),
    (
        "llama layers_to_transform",
        TinyLlamaLogits,
        llama_inputs,
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers", num_experts=2),
    ),
    ("llama q,k,v,o", TinyLlamaLogits, llama_inputs, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]
IDS = [case[0] for case in CASES]
ONE_EXPERT_CASES = [case for case in CASES if case[3].get("num_experts", 4) == 1]
ROUTED_CASES = [case for case in CASES if case[3].get("num_experts", 4) > 1]


def build(model_factory, config_kwargs, adapter_name="default", **overrides):
    torch.manual_seed(0)
    base = model_factory().eval()
    config = MoDEConfig(**{**config_kwargs, **overrides})
    return base, get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name).eval()


def train_steps(model, inputs, steps=4, lr=0.5):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(inputs)
        loss = (output.float() ** 2).mean() + output.float().mean()
        loss.backward()
        optimizer.step()
    model.eval()


def mode_layers(model):
    return [module for module in model.modules() if isinstance(module, MoDELayer)]


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_custom_adapter_name(name, model_factory, make_inputs, kwargs):
    _, model = build(model_factory, kwargs, adapter_name="other")

    adapter_params = [n for n, _ in model.named_parameters() if ".mode_" in n]

    assert adapter_params
    assert all(".other" in n for n in adapter_params)
    assert model.active_adapter == "other"


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_only_adapter_parameters_are_trainable(name, model_factory, make_inputs, kwargs):
    _, model = build(model_factory, kwargs)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert trainable
    for param_name in trainable:
        assert ".mode_" in param_name or "modules_to_save" in param_name, param_name


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_fresh_adapter_keeps_outputs(name, model_factory, make_inputs, kwargs):
    base, model = build(model_factory, kwargs)
    inputs = make_inputs()

    torch.testing.assert_close(model(inputs), base(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_training_updates_adapter_only(name, model_factory, make_inputs, kwargs):
    base, model = build(model_factory, kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = make_inputs()

    train_steps(model, inputs)

    for param_name, param in model.named_parameters():
        changed = not torch.equal(param, before[param_name])
        if param.requires_grad:
            assert changed, f"trainable {param_name} did not change"
        else:
            assert not changed, f"frozen {param_name} changed"
    assert not torch.allclose(model(inputs), base(inputs))


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_load_after_training(tmp_path, name, model_factory, make_inputs, kwargs, safe_serialization):
    base, model = build(model_factory, kwargs)
    inputs = make_inputs()
    train_steps(model, inputs)
    expected = model(inputs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)

    weights_file = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert (tmp_path / weights_file).exists()
    assert torch.equal(loaded(inputs), expected)
    assert all(not p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_config_object_loading(tmp_path, name, model_factory, make_inputs, kwargs):
    """from_pretrained also accepts an explicit config object, as with any peft method."""
    base, model = build(model_factory, kwargs, init_weights=False)
    model.save_pretrained(tmp_path)
    inputs = make_inputs()

    config = MoDEConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config).eval()

    assert torch.equal(loaded(inputs), model.eval()(inputs))


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_disable_adapter_gives_base_output(name, model_factory, make_inputs, kwargs):
    base, model = build(model_factory, kwargs, init_weights=False)
    inputs = make_inputs()
    adapted = model(inputs)

    with model.disable_adapter():
        disabled = model(inputs)
    enabled_again = model(inputs)

    assert not torch.allclose(adapted, base(inputs))
    torch.testing.assert_close(disabled, base(inputs), rtol=0, atol=0)
    torch.testing.assert_close(enabled_again, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_set_adapter_switches_outputs_and_gradients(name, model_factory, make_inputs, kwargs):
    _, model = build(model_factory, kwargs, init_weights=False)
    torch.manual_seed(123)
    model.add_adapter("second", MoDEConfig(**{**kwargs, "init_weights": False}))
    inputs = make_inputs()
    first_output = model(inputs)

    model.set_adapter("second")
    second_output = model(inputs)

    assert model.active_adapter == "second"
    assert not torch.allclose(first_output, second_output)
    for param_name, param in model.named_parameters():
        if ".mode_" in param_name:
            assert param.requires_grad == (".second" in param_name), param_name


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_delete_active_and_inactive_adapters(name, model_factory, make_inputs, kwargs):
    base, model = build(model_factory, kwargs, init_weights=False)
    model.add_adapter("second", MoDEConfig(**{**kwargs, "init_weights": False}))
    model.add_adapter("third", MoDEConfig(**{**kwargs, "init_weights": False}))
    inputs = make_inputs()

    model.delete_adapter("third")
    model.set_adapter("second")
    model.delete_adapter("second")

    assert set(model.peft_config) == {"default"}
    for layer in mode_layers(model):
        assert set(layer.mode_A) == {"default"}
        assert set(layer.mode_B) == {"default"}
        assert set(layer.r) == {"default"}
    assert not any(".second" in n or ".third" in n for n, _ in model.named_parameters())
    model.set_adapter("default")
    assert not torch.allclose(model(inputs), base(inputs))


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
def test_unload_returns_base_model(name, model_factory, make_inputs, kwargs):
    base, model = build(model_factory, kwargs, init_weights=False)
    inputs = make_inputs()

    unloaded = model.unload()

    assert not mode_layers(unloaded)
    torch.testing.assert_close(unloaded(inputs), base(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", ROUTED_CASES, ids=[c[0] for c in ROUTED_CASES])
def test_merge_of_routed_adapter_raises_and_changes_nothing(name, model_factory, make_inputs, kwargs):
    _, model = build(model_factory, kwargs, init_weights=False)
    inputs = make_inputs()
    expected = model(inputs)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}

    for merge in (model.merge_adapter, model.merge_and_unload, model.base_model.merge_and_unload):
        with pytest.raises(MoDEMergeError) as error:
            merge()
        assert "unload()" in str(error.value)
        assert "depend on each token" in str(error.value)
    with pytest.raises(ValueError, match="num_experts"):
        mode_layers(model)[0].merge()

    torch.testing.assert_close(model(inputs), expected, rtol=0, atol=0)
    for param_name, param in model.named_parameters():
        if "base_layer" in param_name:
            assert torch.equal(param, base_weights[param_name])


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", ONE_EXPERT_CASES, ids=[c[0] for c in ONE_EXPERT_CASES])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_one_expert_merges_exactly(name, model_factory, make_inputs, kwargs, safe_merge):
    base, model = build(model_factory, kwargs, init_weights=False)
    inputs = make_inputs()
    expected = model(inputs)

    model.merge_adapter(safe_merge=safe_merge)
    merged = model(inputs)
    model.unmerge_adapter()
    unmerged = model(inputs)
    with model.disable_adapter():
        disabled = model(inputs)
    merged_model = copy.deepcopy(model).merge_and_unload(safe_merge=safe_merge)

    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmerged, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(disabled, base(inputs), rtol=1e-5, atol=1e-6)
    assert not mode_layers(merged_model)
    torch.testing.assert_close(merged_model(inputs), expected, rtol=1e-5, atol=1e-6)


def test_safe_merge_detects_broken_adapter():
    _, model = build(MLP, dict(target_modules=["lin0"], r=2, num_experts=1), init_weights=False)
    layer = model.base_model.model.lin0
    weight_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.mode_B["default"][0, 0, 0] = float("nan")

    with pytest.raises(ValueError, match="'default'.*non-finite"):
        model.merge_adapter(safe_merge=True)

    assert torch.equal(layer.base_layer.weight, weight_before)
    assert not layer.merged


@pytest.mark.parametrize("name,model_factory,make_inputs,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_model(name, model_factory, make_inputs, kwargs, dtype):
    torch.manual_seed(0)
    base = model_factory().to(dtype).eval()
    autocast = get_peft_model(copy.deepcopy(base), MoDEConfig(**kwargs, init_weights=False))
    same_dtype = get_peft_model(
        copy.deepcopy(base), MoDEConfig(**kwargs, init_weights=False), autocast_adapter_dtype=False
    )
    inputs = make_inputs()
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)

    autocast_output = autocast(inputs)
    same_dtype_output = same_dtype(inputs)

    assert all(p.dtype == torch.float32 for n, p in autocast.named_parameters() if ".mode_" in n)
    assert all(p.dtype == dtype for n, p in same_dtype.named_parameters() if ".mode_" in n)
    assert autocast_output.dtype == dtype
    assert same_dtype_output.dtype == dtype
    assert torch.isfinite(autocast_output).all()
    assert torch.isfinite(same_dtype_output).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_step(dtype):
    torch.manual_seed(0)
    model = get_peft_model(
        TinyLlamaLogits().to(dtype), MoDEConfig(target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    inputs = llama_inputs()

    train_steps(model, inputs, steps=2, lr=0.01)

    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(inputs)).all()


def test_modules_to_save_is_trained_and_saved(tmp_path):
    base, model = build(MLP, dict(target_modules=["lin0"], r=2, num_experts=2, modules_to_save=["head"]))
    inputs = mlp_inputs()
    train_steps(model, inputs)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert not torch.equal(model.base_model.model.head.modules_to_save["default"].weight, base.head.weight)
    assert torch.equal(loaded(inputs), model(inputs))


def test_inference_mode_config_freezes_adapter():
    _, model = build(MLP, dict(target_modules=["lin0"], r=2, num_experts=2), inference_mode=True)

    assert model.get_nb_trainable_parameters()[0] == 0


def test_mixed_adapter_batch_matches_per_adapter_outputs():
    base, model = build(MLP, dict(target_modules=["lin0", "lin1"], r=4, num_experts=3), init_weights=False)
    torch.manual_seed(5)
    model.add_adapter("second", MoDEConfig(target_modules=["lin0", "lin1"], r=2, num_experts=2, init_weights=False))
    model.eval()
    inputs = mlp_inputs()
    per_adapter = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        per_adapter[name] = model(inputs)
    per_adapter["__base__"] = base(inputs)
    assignment = ["default", "second", "__base__", "second", "default", "__base__"]

    mixed = model(inputs, adapter_names=assignment)

    for row, name in enumerate(assignment):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=1e-6, atol=1e-6)


def test_mixed_adapter_batch_rejects_bad_names():
    _, model = build(MLP, dict(target_modules=["lin0"], r=2, num_experts=2))
    inputs = mlp_inputs()

    with pytest.raises(ValueError, match=r"unknown adapters \['missing'\]"):
        model(inputs, adapter_names=["missing"] * 6)
    with pytest.raises(ValueError, match="has 2 entries but the batch has 6 samples"):
        model(inputs, adapter_names=["default", "default"])
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(inputs, adapter_names=["default"] * 6)
