"""MoDEConfig: defaults, help metadata, validation messages and JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from peft import PeftConfig

from peft_mode import MODE_PEFT_TYPE, MoDEConfig

OWN_FIELDS = [
    "r",
    "num_experts",
    "expert_rank",
    "share_down_projection",
    "alpha",
    "dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "fan_in_fan_out",
    "init_weights",
    "router_init_scale",
    "top_k",
]


def test_defaults():
    config = MoDEConfig()

    assert config.peft_type == MODE_PEFT_TYPE == "MODE"
    assert (config.r, config.num_experts, config.expert_rank) == (8, 4, 1)
    assert config.share_down_projection is True
    assert config.alpha is None
    assert config.scaling == 1.0
    assert config.num_slots == 8
    assert config.init_weights is True


@pytest.mark.parametrize("name", OWN_FIELDS)
def test_every_field_has_help(name):
    fields = {field.name: field for field in dataclasses.fields(MoDEConfig)}

    assert name in fields
    assert len(fields[name].metadata.get("help", "")) > 10


def test_alpha_sets_scaling():
    assert MoDEConfig(r=8, alpha=16).scaling == 2.0
    assert MoDEConfig(r=8, alpha=None).scaling == 1.0


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"r": 0}, ["r", "0", "positive integer"]),
        ({"r": 2.5}, ["r", "2.5", "positive integer"]),
        ({"r": True}, ["r", "True"]),
        ({"num_experts": 0}, ["num_experts", "0", "positive integer"]),
        ({"num_experts": -3}, ["num_experts", "-3"]),
        ({"expert_rank": 0}, ["expert_rank", "0"]),
        ({"r": 8, "expert_rank": 3}, ["expert_rank", "3", "divide r=8", "[1, 2, 4, 8]"]),
        ({"alpha": 0}, ["alpha", "0", "positive"]),
        ({"alpha": -1.0}, ["alpha", "-1.0"]),
        ({"dropout": 1.0}, ["dropout", "1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout", "-0.1"]),
        ({"router_init_scale": -0.5}, ["router_init_scale", "-0.5", ">= 0"]),
        ({"router_init_scale": 0.0}, ["router_init_scale", "0.0", "same gradient"]),
        ({"share_down_projection": "yes"}, ["share_down_projection", "'yes'", "True or False"]),
        ({"init_weights": "gaussian"}, ["init_weights", "'gaussian'"]),
        ({"target_modules": ".*proj", "layers_to_transform": [0]}, ["layers_to_transform", ".*proj"]),
        ({"target_modules": ".*proj", "layers_pattern": "layers"}, ["layers_pattern", ".*proj"]),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, ["layers_pattern", "layers_to_transform"]),
        ({"target_modules": ["q"], "layers_to_transform": [-1]}, ["layers_to_transform", "-1"]),
    ],
)
def test_invalid_values_name_field_value_and_range(kwargs, fragments):
    with pytest.raises(ValueError) as error:
        MoDEConfig(**kwargs)

    for fragment in fragments:
        assert fragment in str(error.value)


def test_zero_router_allowed_with_random_up_projections():
    config = MoDEConfig(router_init_scale=0.0, init_weights=False)

    assert config.router_init_scale == 0.0


def test_zero_router_allowed_with_one_expert():
    assert MoDEConfig(num_experts=1, router_init_scale=0.0).num_experts == 1


def test_target_module_lists_become_sets():
    config = MoDEConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"])

    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.exclude_modules == {"lm_head"}


def test_json_round_trip(tmp_path):
    config = MoDEConfig(
        r=12,
        num_experts=6,
        expert_rank=4,
        share_down_projection=False,
        alpha=24.0,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        router_init_scale=0.05,
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftConfig.from_pretrained(tmp_path)

    assert saved["peft_type"] == "MODE"
    assert isinstance(loaded, MoDEConfig)
    for name in OWN_FIELDS:
        assert getattr(loaded, name) == getattr(config, name), name


@pytest.mark.parametrize("top_k", [0, 5, 2.0, True])
def test_top_k_range_checked(top_k):
    with pytest.raises(ValueError) as error:
        MoDEConfig(num_experts=4, top_k=top_k)

    assert "top_k" in str(error.value) and "num_experts=4" in str(error.value) and repr(top_k) in str(error.value)


def test_top_k_saved_with_config(tmp_path):
    MoDEConfig(num_experts=4, top_k=2).save_pretrained(tmp_path)

    assert PeftConfig.from_pretrained(tmp_path).top_k == 2
