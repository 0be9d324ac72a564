"""Training a MoDE adapter with the real Hugging Face Trainer on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_llama
from peft_mode import MoDEConfig, MoDELayer

SEQUENCE_LENGTH = 12


def two_task_dataset(samples_per_task: int = 16) -> Dataset:
    """Two tasks with different token statistics: counting up by one, and by three."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for step in (1, 3):
        for _ in range(samples_per_task):
            start = int(torch.randint(3, 20, (1,), generator=generator))
            tokens = [3 + (start + step * position) % 60 for position in range(SEQUENCE_LENGTH)]
            rows.append({"input_ids": tokens, "attention_mask": [1] * SEQUENCE_LENGTH, "labels": tokens})
    return Dataset.from_list(rows)


def training_arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        max_steps=60,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def mean_loss(model, dataset) -> float:
    model.eval()
    batch = {key: torch.tensor(dataset[key]) for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        return model(**batch).loss.item()


def make_model(**overrides):
    settings = dict(r=4, num_experts=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    settings.update(overrides)
    return get_peft_model(make_tiny_llama(), MoDEConfig(**settings))


def test_trainer_lowers_loss_and_changes_only_adapter(tmp_path):
    dataset = two_task_dataset()
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = mean_loss(model, dataset)

    Trainer(model=model, args=training_arguments(tmp_path), train_dataset=dataset).train()

    loss_after = mean_loss(model, dataset)
    assert loss_after < 0.8 * loss_before
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (".mode_" in name), name


def test_experts_specialise_after_training(tmp_path):
    """With B starting at zero, a router that starts random still makes the experts' B slices differ."""
    model = make_model(num_experts=3)

    Trainer(model=model, args=training_arguments(tmp_path, max_steps=10), train_dataset=two_task_dataset()).train()

    for module in model.modules():
        if isinstance(module, MoDELayer):
            experts = module.mode_B["default"].detach()
            assert experts.abs().sum() > 0
            for i in range(experts.shape[0]):
                for j in range(i + 1, experts.shape[0]):
                    difference = (experts[i] - experts[j]).norm() / experts[i].norm()
                    assert difference > 1e-3, f"experts {i} and {j} are identical"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_through_trainer(tmp_path, use_reentrant):
    model = make_model()
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    arguments = training_arguments(
        tmp_path,
        max_steps=3,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=two_task_dataset())
    before = {name: p.detach().clone() for name, p in model.named_parameters() if ".mode_" in name}

    trainer.train()

    assert model.base_model.model.is_gradient_checkpointing
    for name, value in before.items():
        assert not torch.equal(model.get_parameter(name), value), f"{name} got no gradient"
    # The first step's gradients equal those without checkpointing.
    batch = {key: torch.tensor(two_task_dataset()[key][:4]) for key in ("input_ids", "labels")}
    fresh = make_model()
    fresh.load_state_dict(reference.state_dict())
    fresh.base_model.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    fresh.enable_input_require_grads()
    fresh.train()
    fresh(**batch).loss.backward()
    reference.train()
    reference(**batch).loss.backward()
    for (name, p_checkpointed), (_, p_plain) in zip(fresh.named_parameters(), reference.named_parameters()):
        if p_plain.grad is not None:
            torch.testing.assert_close(p_checkpointed.grad, p_plain.grad, msg=name)
