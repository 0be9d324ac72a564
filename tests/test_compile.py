"""torch.compile (default mode) on a model with MoDE layers gives the eager outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import make_tiny_llama
from peft_mode import MoDEConfig


@pytest.mark.slow
def test_compiled_model_matches_eager():
    model = get_peft_model(
        make_tiny_llama(),
        MoDEConfig(r=4, num_experts=3, expert_rank=2, target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    compiled = torch.compile(model)
    input_ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))

    model.eval()
    with torch.no_grad():
        eager_logits = model(input_ids=input_ids).logits
        compiled_logits = compiled(input_ids=input_ids).logits
    model.train()
    compiled(input_ids=input_ids, labels=input_ids).loss.backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()

    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert compiled_grads and all(".mode_" in name for name in compiled_grads)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(compiled_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
