"""Routing statistics: figures against a hand computation, padding exclusion, and the Trainer callback."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import make_tiny_llama
from peft_mode import MoDEConfig, MoDELinear, RouterStatsCallback
from peft_mode.training.router_stats import RouterStatsRecorder, flatten_for_logs

# Fixed routing weights of 3 tokens, 2 slots, 3 experts (each row sums to 1).
FIXED_ROUTING = torch.tensor(
    [
        [[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.1, 0.8, 0.1], [0.5, 0.25, 0.25]],
        [[0.2, 0.2, 0.6], [0.9, 0.05, 0.05]],
    ]
)


class FixedRoutingModel(nn.Module):
    """A model whose only MoDE layer reports FIXED_ROUTING on every forward pass."""

    def __init__(self):
        super().__init__()
        self.proj = MoDELinear(nn.Linear(4, 4), "default", MoDEConfig(r=2, num_experts=3))

    def forward(self, input_ids=None, attention_mask=None):
        if self.proj.routing_observer is not None:
            self.proj.routing_observer(self.proj, "default", FIXED_ROUTING)
        return input_ids


def hand_figures(token_indices):
    """Plain-Python mean weights, entropy and load CV over the chosen tokens."""
    slots, experts = 2, 3
    mean = [[sum(float(FIXED_ROUTING[n, k, i]) for n in token_indices) / len(token_indices) for i in range(experts)]
            for k in range(slots)]
    entropies = [
        -sum(float(w) * math.log(float(w)) for w in FIXED_ROUTING[n, k]) for n in token_indices for k in range(slots)
    ]
    load = [sum(mean[k][i] for k in range(slots)) / slots for i in range(experts)]
    load_mean = sum(load) / experts
    load_std = math.sqrt(sum((value - load_mean) ** 2 for value in load) / experts)
    return mean, sum(entropies) / len(entropies), load, load_std / load_mean


@pytest.mark.parametrize("mask, tokens", [(None, [0, 1, 2]), ([[1, 0, 1]], [0, 2]), ([[0, 1, 1]], [1, 2])])
def test_figures_match_hand_computation(mask, tokens):
    model = FixedRoutingModel()
    recorder = RouterStatsRecorder(model).attach()
    attention_mask = None if mask is None else torch.tensor(mask)

    model(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=attention_mask)
    summary = recorder.summary()

    mean, entropy, load, load_cv = hand_figures(tokens)
    figures = summary["layers"]["proj"]
    assert figures["tokens"] == len(tokens)
    torch.testing.assert_close(torch.tensor(figures["expert_weights"]), torch.tensor(mean), rtol=1e-6, atol=1e-7)
    assert figures["entropy"] == pytest.approx(entropy, rel=1e-6)
    assert figures["expert_load"] == pytest.approx(load, rel=1e-6)
    assert figures["load_cv"] == pytest.approx(load_cv, rel=1e-6)
    assert summary["overall"]["expert_load"] == pytest.approx(load, rel=1e-6)


def test_sums_accumulate_and_reset():
    model = FixedRoutingModel()
    recorder = RouterStatsRecorder(model).attach()

    model(input_ids=torch.zeros(1, 3))
    model(input_ids=torch.zeros(1, 3))
    twice = recorder.summary()["layers"]["proj"]["tokens"]
    recorder.reset()

    assert twice == 6
    assert recorder.summary()["overall"] is None


def test_observer_ignores_calls_outside_forward():
    """Recomputation in gradient checkpointing runs outside the model's forward and is not counted."""
    model = FixedRoutingModel()
    recorder = RouterStatsRecorder(model).attach()

    model.proj.routing_observer(model.proj, "default", FIXED_ROUTING)

    assert recorder.summary()["overall"] is None


def test_detach_restores_layers():
    model = FixedRoutingModel()
    recorder = RouterStatsRecorder(model).attach()

    recorder.detach()

    assert model.proj.routing_observer is None
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_padding_tokens_are_excluded_in_a_real_model():
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_llama(), MoDEConfig(r=4, num_experts=3, target_modules=["q_proj"], router_init_scale=0.5))
    model.eval()
    layer_name = "base_model.model.model.layers.1.self_attn.q_proj"
    captured = {}
    model.get_submodule(layer_name).register_forward_hook(lambda m, args, out: captured.update(x=args[0].detach()))
    input_ids = torch.randint(3, 60, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    recorder = RouterStatsRecorder(model).attach()

    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)

    weights = model.base_model.routing_weights_of(layer_name.removeprefix("base_model.model."), "default", captured["x"])
    kept = weights[attention_mask.bool()]  # (10, S, m)
    figures = recorder.summary()["layers"]["layers.1.self_attn.q_proj"]
    assert figures["tokens"] == 10
    torch.testing.assert_close(torch.tensor(figures["expert_weights"]), kept.mean(0), rtol=1e-5, atol=1e-6)
    all_tokens = weights.reshape(-1, *weights.shape[2:]).mean(0)
    assert not torch.allclose(torch.tensor(figures["expert_weights"]), all_tokens, atol=1e-6)


def test_flatten_for_logs_levels():
    model = FixedRoutingModel()
    recorder = RouterStatsRecorder(model).attach()
    model(input_ids=torch.zeros(1, 3))
    summary = recorder.summary()

    overall = flatten_for_logs(summary, "overall")
    layer = flatten_for_logs(summary, "layer")
    slot = flatten_for_logs(summary, "slot")

    assert set(overall) == {"router/entropy", "router/load_cv", "router/expert_0", "router/expert_1", "router/expert_2"}
    assert "router/proj/expert_2" in layer and "router/proj/slot_1/expert_0" not in layer
    assert slot["router/proj/slot_1/expert_0"] == pytest.approx(float(FIXED_ROUTING[:, 1, 0].mean()))
    with pytest.raises(ValueError, match="'everything'"):
        flatten_for_logs(summary, "everything")


def toy_dataset(tasks=("a", "b")):
    rows = []
    for task_index, task in enumerate(tasks):
        for sample in range(8):
            tokens = [3 + (task_index * 20 + sample + position) % 60 for position in range(10)]
            rows.append({"input_ids": tokens, "attention_mask": [1] * 10, "labels": tokens, "task": task})
    return Dataset.from_list(rows)


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration: records what on_log receives."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def collate(examples):
    return {key: torch.tensor([example[key] for example in examples]) for key in ("input_ids", "attention_mask")}


def run_trainer(tmp_path, callback, reporter):
    model = get_peft_model(make_tiny_llama(), MoDEConfig(r=4, num_experts=3, target_modules=["q_proj", "v_proj"]))
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )
    dataset = toy_dataset().remove_columns("task")
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[reporter, callback])
    trainer.train()
    return model, trainer


def test_callback_adds_figures_to_trainer_logs(tmp_path):
    reporter = LogRecorder()
    callback = RouterStatsCallback(
        detail="layer", per_task_dataset=toy_dataset(), collator=collate, max_batches_per_task=1
    )

    model, trainer = run_trainer(tmp_path, callback, reporter)

    step_logs = [logs for logs in reporter.seen if "loss" in logs]
    assert len(step_logs) == 2
    for logs in step_logs:
        assert 0 < logs["router/entropy"] <= math.log(3) + 1e-6
        assert sum(logs[f"router/expert_{i}"] for i in range(3)) == pytest.approx(1.0, rel=1e-5)
        assert "router/layers.0.self_attn.q_proj/load_cv" in logs
    history = [record for record in trainer.state.log_history if "loss" in record]
    assert all("router/entropy" in record for record in history)
    records = [json.loads(line) for line in (tmp_path / "router_stats.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert records[0]["layers"]["layers.1.self_attn.v_proj"]["tokens"] == 2 * 4 * 10
    usage = json.loads((tmp_path / "router_usage_by_task.json").read_text())
    assert set(usage) == {"a", "b"}
    assert sum(usage["a"]["average"]) == pytest.approx(1.0, rel=1e-5)
    assert (tmp_path / "router_heatmap_average.png").stat().st_size > 1000
    assert list((tmp_path).glob("router_heatmap_layers.*.png"))
    assert all(layer.routing_observer is None for _, layer in model.base_model.mode_layers())


def test_disabled_callback_records_nothing(tmp_path):
    reporter = LogRecorder()
    callback = RouterStatsCallback(enabled=False)

    run_trainer(tmp_path, callback, reporter)

    assert not any(key.startswith("router/") for logs in reporter.seen for key in logs)
    assert not (tmp_path / "router_stats.jsonl").exists()


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="collator"):
        RouterStatsCallback(per_task_dataset=toy_dataset())
    with pytest.raises(ValueError, match="'task' column"):
        RouterStatsCallback(per_task_dataset=toy_dataset().remove_columns("task"), collator=collate)
    with pytest.raises(ValueError, match="detail"):
        RouterStatsCallback(detail="all")
