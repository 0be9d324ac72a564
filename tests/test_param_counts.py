"""Trainable parameter counts equal the closed-form counts of LoRA, MoLoRA, MoLoRA-SD and MoDE."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from conftest import make_tiny_llama
from peft_mode import MoDEConfig
from peft_mode.budget import layer_shapes, method_parameter_count, propose_matching_configs, total_parameter_count

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hand_count(P, Q, r, m, p, shared):
    """The per-matrix formulas, written out: MoDE r*P + m*r*Q + (r/p)*m*P, MoLoRA m*r*P + m*r*Q + m*P."""
    if m == 1:
        return r * P + r * Q
    down = r * P if shared else m * r * P
    return down + m * r * Q + (r // p) * m * P


def tiny_llama_shapes():
    # hidden 32, 4 heads of 8, 2 key-value heads: q and o are 32 -> 32, k and v are 32 -> 16, two layers.
    return [(32, 32), (32, 16), (32, 16), (32, 32)] * 2


@pytest.mark.parametrize(
    "r,m,p,shared",
    [(8, 4, 1, True), (8, 4, 2, True), (8, 4, 8, True), (4, 3, 4, False), (6, 2, 3, False), (8, 1, 1, True)],
)
def test_model_count_matches_formula(r, m, p, shared):
    model = get_peft_model(
        make_tiny_llama(),
        MoDEConfig(r=r, num_experts=m, expert_rank=p, share_down_projection=shared, target_modules=TARGETS),
    )

    trainable, _ = model.get_nb_trainable_parameters()

    assert trainable == sum(hand_count(P, Q, r, m, p, shared) for P, Q in tiny_llama_shapes())


def test_one_expert_counts_as_lora():
    mode_model = get_peft_model(make_tiny_llama(), MoDEConfig(r=8, num_experts=1, target_modules=TARGETS))
    lora_model = get_peft_model(make_tiny_llama(), LoraConfig(r=8, target_modules=TARGETS))

    assert mode_model.get_nb_trainable_parameters() == lora_model.get_nb_trainable_parameters()


@pytest.mark.parametrize(
    "method,r,m,p,expected",
    [
        # P = 576, Q = 1536 (SmolLM2's MLP up-projection)
        ("lora", 8, 1, None, 8 * 576 + 8 * 1536),
        ("molora", 4, 12, None, 12 * 4 * 576 + 12 * 4 * 1536 + 12 * 576),
        ("molora_sd", 8, 24, None, 8 * 576 + 24 * 8 * 1536 + 24 * 576),
        ("mode", 4, 14, 1, 4 * 576 + 14 * 4 * 1536 + 4 * 14 * 576),
        ("mode", 16, 12, 8, 16 * 576 + 12 * 16 * 1536 + 2 * 12 * 576),
    ],
)
def test_method_counts(method, r, m, p, expected):
    assert method_parameter_count(method, 576, 1536, r, m, p) == expected


def test_layer_shapes_finds_targets():
    shapes = layer_shapes(make_tiny_llama(), TARGETS)

    assert [(P, Q) for _, P, Q in shapes] == tiny_llama_shapes()


def test_layer_shapes_rejects_unmatched_targets():
    with pytest.raises(ValueError, match="gate_projection"):
        layer_shapes(make_tiny_llama(), ["gate_projection"])


def test_budget_proposals_are_within_tolerance():
    shapes = [("layer", 576, 576)] * 4
    budget = total_parameter_count(shapes, "mode", 4, 14, 1)

    proposals = propose_matching_configs(shapes, budget, tolerance=0.03)

    assert proposals["mode"][0].parameters == budget
    assert (proposals["mode"][0].r, proposals["mode"][0].num_experts, proposals["mode"][0].expert_rank) == (4, 14, 1)
    for method in ("lora", "molora", "molora_sd", "mode"):
        assert proposals[method], method
        for spec in proposals[method]:
            assert abs(spec.parameters - budget) <= 0.03 * budget
            assert spec.parameters == total_parameter_count(shapes, method, spec.r, spec.num_experts, spec.expert_rank)


def test_budget_mode_proposals_exclude_molora_sd():
    shapes = [("layer", 576, 576)] * 4
    budget = total_parameter_count(shapes, "lora", 32)

    proposals = propose_matching_configs(shapes, budget, tolerance=0.05)

    assert proposals["mode"]
    assert all(spec.expert_rank < spec.r for spec in proposals["mode"])
