"""Saving and loading MoDE adapters through every PEFT entry point, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_gpt2, make_tiny_llama
from peft_mode import MoDEConfig

MODELS = {
    "llama": (make_tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"]),
}


def trained_like_config(targets, **overrides):
    settings = dict(
        r=4,
        num_experts=3,
        expert_rank=2,
        target_modules=targets,
        init_weights=False,
        router_init_scale=0.3,
        task_type="CAUSAL_LM",
    )
    settings.update(overrides)
    return MoDEConfig(**settings)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("shared", [True, False])
def test_round_trip_is_bit_exact(tmp_path, token_batch, model_name, shared):
    make_model, targets = MODELS[model_name]
    model = get_peft_model(make_model(), trained_like_config(targets, share_down_projection=shared)).eval()
    expected = model(token_batch).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_model(), tmp_path).eval()

    assert torch.equal(loaded(token_batch).logits, expected)
    original_state = get_peft_model_state_dict(model)
    loaded_state = get_peft_model_state_dict(loaded)
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key


def test_saved_files_and_state_dict_layout(tmp_path):
    model = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj", "v_proj"], r=4, num_experts=3))
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")

    assert config["peft_type"] == "MODE"
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    prefix = "base_model.model.model.layers.0.self_attn"
    # P = 32; q_proj has Q = 32, v_proj has Q = 16 (two key-value heads of 8); S = r / p = 2.
    assert tensors[f"{prefix}.q_proj.mode_A.weight"].shape == (4, 32)
    assert tensors[f"{prefix}.q_proj.mode_B"].shape == (3, 32, 4)
    assert tensors[f"{prefix}.q_proj.mode_router.weight"].shape == (2 * 3, 32)
    assert tensors[f"{prefix}.v_proj.mode_B"].shape == (3, 16, 4)
    assert all(".mode_" in key for key in tensors)
    assert len(tensors) == 2 * 2 * 3


def test_unshared_down_projection_layout(tmp_path):
    model = get_peft_model(
        make_tiny_llama(), trained_like_config(["q_proj"], r=4, num_experts=3, share_down_projection=False)
    )
    model.save_pretrained(tmp_path)

    tensors = load_file(tmp_path / "adapter_model.safetensors")

    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.mode_A.weight"].shape == (3 * 4, 32)


def test_peft_config_from_pretrained(tmp_path):
    get_peft_model(make_tiny_llama(), trained_like_config(["q_proj"])).save_pretrained(tmp_path)

    config = PeftConfig.from_pretrained(tmp_path)

    assert isinstance(config, MoDEConfig)
    assert (config.r, config.num_experts, config.expert_rank) == (4, 3, 2)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_auto_peft_model_for_causal_lm(tmp_path, token_batch, model_name):
    make_model, targets = MODELS[model_name]
    base_dir = tmp_path / "base"
    make_model().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), trained_like_config(targets)).eval()
    expected = model(token_batch).logits
    model.save_pretrained(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()

    assert config["base_model_name_or_path"] == str(base_dir)
    assert torch.equal(loaded(token_batch).logits, expected)


def test_low_cpu_mem_usage_loading(tmp_path, token_batch):
    model = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj", "v_proj"])).eval()
    expected = model(token_batch).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, low_cpu_mem_usage=True).eval()

    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert torch.equal(loaded(token_batch).logits, expected)


def test_two_adapters_save_and_load(tmp_path, token_batch):
    model = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj", "v_proj"]))
    torch.manual_seed(99)
    model.add_adapter("second", trained_like_config(["q_proj", "o_proj"], r=6, num_experts=2, expert_rank=3))
    model.eval()
    outputs = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        outputs[name] = model(token_batch).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    loaded.load_adapter(tmp_path / "second", adapter_name="second")

    assert (tmp_path / "second" / "adapter_config.json").exists()
    assert not torch.equal(outputs["default"], outputs["second"])
    for name in ("default", "second"):
        loaded.set_adapter(name)
        assert torch.equal(loaded(token_batch).logits, outputs[name]), name


def test_selected_adapters_only(tmp_path):
    model = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj"]))
    model.add_adapter("second", trained_like_config(["v_proj"]))

    model.save_pretrained(tmp_path, selected_adapters=["second"])

    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_state_dict_round_trip_without_files(token_batch):
    source = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj", "v_proj"])).eval()
    target = get_peft_model(make_tiny_llama(), trained_like_config(["q_proj", "v_proj"], init_weights=True)).eval()
    assert not torch.equal(source(token_batch).logits, target(token_batch).logits)

    result = set_peft_model_state_dict(target, get_peft_model_state_dict(source))

    assert not result.unexpected_keys
    assert torch.equal(source(token_batch).logits, target(token_batch).logits)


def test_is_trainable_loading(tmp_path):
    get_peft_model(make_tiny_llama(), trained_like_config(["q_proj"])).save_pretrained(tmp_path)

    frozen = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    trainable = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)

    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert trainable.get_nb_trainable_parameters()[0] > 0
    assert all(".mode_" in name for name, p in trainable.named_parameters() if p.requires_grad)
