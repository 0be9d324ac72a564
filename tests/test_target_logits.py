"""Computing logits only at labelled positions leaves the loss and the training unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_gpt2, make_tiny_llama
from peft_mode import MoDEConfig
from peft_mode.data import IGNORE_INDEX, CausalLMCollator
from peft_mode.training import TargetLogitsTrainer, logits_only_at, next_token_positions, selected_token_loss


def masked_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 60, (3, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :7] = IGNORE_INDEX
    labels[1, 10:] = IGNORE_INDEX
    labels[2, :9] = IGNORE_INDEX
    return input_ids, labels


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2])
def test_selected_logits_give_the_full_loss_and_gradients(make_model):
    model = get_peft_model(make_model(), MoDEConfig(r=4, num_experts=3, target_modules="all-linear", init_weights=False))
    input_ids, labels = masked_batch()

    full = model(input_ids=input_ids, labels=labels).loss
    full.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with logits_only_at(model.get_output_embeddings(), next_token_positions(labels)):
        outputs = model(input_ids=input_ids)
    selected = selected_token_loss(outputs, labels)
    selected.backward()

    assert outputs.logits.shape[:2] == (1, int((labels[:, 1:] != IGNORE_INDEX).sum()))
    torch.testing.assert_close(selected, full, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_next_token_positions():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])

    assert next_token_positions(labels).tolist() == [[False, True, True, False], [True, False, False, False]]


def test_trainer_with_gradient_accumulation_matches_plain_trainer(tmp_path):
    rows = []
    for seed in range(8):
        input_ids, labels = masked_batch(seed)
        for row in range(3):
            rows.append({"input_ids": input_ids[row].tolist(), "attention_mask": [1] * 12, "labels": labels[row].tolist()})
    dataset = Dataset.from_list(rows)
    base = get_peft_model(make_tiny_llama(), MoDEConfig(r=4, num_experts=3, target_modules=["q_proj", "v_proj"]))
    models = {"plain": copy.deepcopy(base), "selected": copy.deepcopy(base)}

    def arguments(name):
        return TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=3,
            gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0, logging_steps=1, optim="sgd",  # Adam would magnify float rounding
        )

    collator = CausalLMCollator(pad_token_id=0)
    plain = Trainer(model=models["plain"], args=arguments("plain"), train_dataset=dataset, data_collator=collator)
    selected = TargetLogitsTrainer(model=models["selected"], args=arguments("selected"), train_dataset=dataset,
                                   data_collator=collator)
    plain.train()
    selected.train()

    plain_losses = [record["loss"] for record in plain.state.log_history if "loss" in record]
    selected_losses = [record["loss"] for record in selected.state.log_history if "loss" in record]
    assert selected_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, p_plain), (_, p_selected) in zip(models["plain"].named_parameters(), models["selected"].named_parameters()):
        torch.testing.assert_close(p_selected, p_plain, rtol=1e-4, atol=1e-6, msg=name)


def test_conflicting_loss_function_rejected():
    with pytest.raises(ValueError, match="compute_loss_func"):
        TargetLogitsTrainer(model=make_tiny_llama(), compute_loss_func=lambda *args, **kwargs: 0)
