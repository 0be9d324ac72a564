"""Error paths of the tuner: unsupported modules, missing defaults and merge attempts."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from conftest import make_tiny_gpt2, make_tiny_llama
from peft_mode import MoDEConfig, MoDEMergeError


class WithEmbeddingAndConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 1, 3)
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("target, type_name", [("embed", "torch.nn.modules.sparse.Embedding"), ("conv", "Conv2d")])
def test_unsupported_module_type_raises_type_error(target, type_name):
    with pytest.raises(TypeError) as error:
        get_peft_model(WithEmbeddingAndConv(), MoDEConfig(target_modules=[target]))

    message = str(error.value)
    assert f"'{target}'" in message
    assert type_name in message
    assert "torch.nn.Linear" in message and "Conv1D" in message


def test_default_targets_for_known_model_types():
    llama = get_peft_model(make_tiny_llama(), MoDEConfig())
    gpt2 = get_peft_model(make_tiny_gpt2(), MoDEConfig())

    assert llama.peft_config["default"].target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert gpt2.peft_config["default"].target_modules == {"c_attn"}
    assert len(llama.base_model.mode_layers()) == 2 * 4


def test_missing_targets_for_unknown_model_raise():
    with pytest.raises(ValueError) as error:
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), MoDEConfig())

    assert "target_modules" in str(error.value)
    assert "'all-linear'" in str(error.value)


def test_targets_that_match_nothing_raise():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(make_tiny_llama(), MoDEConfig(target_modules=["query_projection"]))


def test_merge_error_is_a_value_error_with_fix():
    model = get_peft_model(make_tiny_llama(), MoDEConfig(num_experts=3, target_modules=["q_proj"]))

    with pytest.raises(ValueError) as error:
        model.merge_and_unload()

    assert isinstance(error.value, MoDEMergeError)
    message = str(error.value)
    assert "'default'" in message and "num_experts=3" in message
    assert "Keep the adapter unmerged" in message and "unload()" in message


def test_merge_of_unknown_adapter_raises():
    model = get_peft_model(make_tiny_llama(), MoDEConfig(num_experts=1, target_modules=["q_proj"]))

    with pytest.raises(ValueError, match="'missing' not found"):
        model.merge_adapter(adapter_names=["missing"])


def test_conv1d_gets_fan_in_fan_out_with_warning():
    with pytest.warns(UserWarning, match="Conv1D"):
        model = get_peft_model(make_tiny_gpt2(), MoDEConfig(target_modules=["c_attn"]))

    assert model.peft_config["default"].fan_in_fan_out is True


def test_linear_drops_fan_in_fan_out_with_warning():
    with pytest.warns(UserWarning, match="torch.nn.Linear"):
        model = get_peft_model(make_tiny_llama(), MoDEConfig(target_modules=["q_proj"], fan_in_fan_out=True))

    assert model.peft_config["default"].fan_in_fan_out is False
    assert torch.isfinite(model(torch.ones(1, 3, dtype=torch.long)).logits).all()
