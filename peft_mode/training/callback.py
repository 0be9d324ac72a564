"""`RouterStatsCallback`: routing statistics of MoDE adapters in the Trainer's logs."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from .router_stats import RouterStatsRecorder, flatten_for_logs

logger = logging.getLogger(__name__)

STATS_FILE = "router_stats.jsonl"
TASK_USAGE_FILE = "router_usage_by_task.json"


@torch.no_grad()
def routing_usage_by_task(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 8,
    max_batches_per_task: Optional[int] = 4,
    adapter_name: Optional[str] = None,
) -> dict[str, dict[str, Any]]:
    """Run the model over each task's examples and return its routing figures per task.

    Args:
        model: a model with MoDE layers.
        dataset: tokenised examples with a ``task`` column and input_ids / attention_mask.
        collator: turns a list of examples into model inputs.
        batch_size: examples per forward pass.
        max_batches_per_task: cap on batches per task; None uses every example.
        adapter_name: adapter to observe; None observes the active one.

    Returns:
        ``{task: {"layers": {layer: expert_load}, "average": expert_load, "entropy": ..., "load_cv": ...}}``
        where expert_load lists the mean routing weight of each expert over the task's tokens.
    """
    recorder = RouterStatsRecorder(model, adapter_name)
    if not recorder.layers:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    usage: dict[str, dict[str, Any]] = {}
    columns = [name for name in ("input_ids", "attention_mask") if name in dataset.column_names]
    try:
        recorder.attach()
        for task in dict.fromkeys(dataset["task"]):
            rows = [index for index, name in enumerate(dataset["task"]) if name == task]
            if max_batches_per_task is not None:
                rows = rows[: batch_size * max_batches_per_task]
            recorder.reset()
            for start in range(0, len(rows), batch_size):
                examples = [{key: dataset[row][key] for key in columns} for row in rows[start : start + batch_size]]
                batch = {key: value.to(device) for key, value in collator(examples).items() if key in columns}
                model(**batch)
            summary = recorder.summary()
            if summary["overall"] is None:
                continue
            usage[task] = {
                "layers": {name: figures["expert_load"] for name, figures in summary["layers"].items()},
                "average": summary["overall"].get("expert_load"),
                "entropy": summary["overall"]["entropy"],
                "load_cv": summary["overall"]["load_cv"],
                "tokens": summary["overall"]["tokens"],
            }
    finally:
        recorder.detach()
        model.train(was_training)
    return usage


def write_task_usage(
    usage: dict[str, dict[str, Any]], output_dir: Path, heatmap_layer: Optional[str] = None
) -> dict[str, Path]:
    """Write the per-task usage as JSON and as task x expert heatmaps; return the written paths.

    One heatmap shows the average over layers, one the layer ``heatmap_layer`` (the middle
    MoDE layer when None).
    """
    from ..plots import routing_heatmap  # matplotlib is imported only when figures are written

    output_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": output_dir / TASK_USAGE_FILE}
    written["json"].write_text(json.dumps(usage, indent=2))
    if not usage:
        return written
    tasks = list(usage)
    layer_names = list(next(iter(usage.values()))["layers"])
    if heatmap_layer is None:
        heatmap_layer = layer_names[len(layer_names) // 2]
    if heatmap_layer not in layer_names:
        raise ValueError(f"heatmap_layer {heatmap_layer!r} is not a routed MoDE layer; choose one of {layer_names}.")

    if all(usage[task]["average"] is not None for task in tasks):
        written["average"] = routing_heatmap(
            [usage[task]["average"] for task in tasks],
            tasks,
            output_dir / "router_heatmap_average.png",
            "Mean routing weight per task, averaged over MoDE layers",
        )
    written["layer"] = routing_heatmap(
        [usage[task]["layers"][heatmap_layer] for task in tasks],
        tasks,
        output_dir / f"router_heatmap_{heatmap_layer.replace('/', '_')}.png",
        f"Mean routing weight per task: {heatmap_layer}",
    )
    return written


class RouterStatsCallback(TrainerCallback):
    """Adds routing statistics of MoDE adapters to the Trainer's logs.

    At every logging step it adds figures over the non-padding training tokens since the
    previous log: the mean routing weight of each expert, the routing entropy and the
    coefficient of variation of the expert load, per MoDE layer and overall (see
    `peft_mode.training.router_stats`). The entries go into the same log record as the
    loss, so they reach the console, ``state.log_history`` and the reporting integrations
    (TensorBoard, W&B, ...). Complete records, per slot included, are appended to
    ``router_stats.jsonl`` in the output folder.

    At the end of training, when ``per_task_dataset`` is given, it measures which experts
    each task uses and writes ``router_usage_by_task.json`` and task x expert heatmaps.

    Args:
        enabled: False turns collection off; the MoDE layers then do no extra work.
        detail: log entries per step: ``"overall"``, ``"layer"`` (default) or ``"slot"``.
        adapter_name: adapter to observe; None observes the active one.
        per_task_dataset: tokenised examples with a ``task`` column for the per-task view.
        collator: batches ``per_task_dataset`` examples; required with it.
        batch_size: batch size of the per-task pass.
        max_batches_per_task: cap on batches per task in the per-task pass.
        heatmap_layer: layer of the per-task heatmap (short name such as
            ``layers.3.self_attn.q_proj``); None picks the middle layer.
        output_dir: where files go; None uses ``TrainingArguments.output_dir``.
    """

    def __init__(
        self,
        enabled: bool = True,
        detail: str = "layer",
        adapter_name: Optional[str] = None,
        per_task_dataset: Optional[Dataset] = None,
        collator: Optional[Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]] = None,
        batch_size: int = 8,
        max_batches_per_task: Optional[int] = 4,
        heatmap_layer: Optional[str] = None,
        output_dir: Optional[str] = None,
    ):
        if detail not in ("overall", "layer", "slot"):
            raise ValueError(f"detail must be 'overall', 'layer' or 'slot', got {detail!r}.")
        if per_task_dataset is not None and collator is None:
            raise ValueError("per_task_dataset needs a collator that turns its examples into model inputs.")
        if per_task_dataset is not None and "task" not in per_task_dataset.column_names:
            raise ValueError(
                f"per_task_dataset needs a 'task' column; it has {per_task_dataset.column_names}."
            )
        self.enabled = enabled
        self.detail = detail
        self.adapter_name = adapter_name
        self.per_task_dataset = per_task_dataset
        self.collator = collator
        self.batch_size = batch_size
        self.max_batches_per_task = max_batches_per_task
        self.heatmap_layer = heatmap_layer
        self.output_dir = output_dir
        self.recorder: Optional[RouterStatsRecorder] = None
        self.task_usage: dict[str, dict[str, Any]] = {}
        self._placed = False

    def _place_before_reporters(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer calls callbacks in list order and puts the reporting integrations before
        callbacks passed by the user, so entries added in `on_log` would miss them.
        """
        if self._placed:
            return
        # NOTE: the callback handler is not passed to callbacks, so it is found on the call
        # stack (CallbackHandler.call_event of transformers 5 is the caller).
        frame = inspect.currentframe()
        try:
            while frame is not None:
                handler = frame.f_locals.get("self")
                if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                    handler.callbacks.remove(self)
                    handler.callbacks.insert(0, self)
                    self._placed = True
                    return
                frame = frame.f_back
        finally:
            del frame
        logger.warning(
            "RouterStatsCallback could not move ahead of the reporting callbacks; its figures reach "
            "state.log_history and %s but may miss TensorBoard or W&B.",
            STATS_FILE,
        )
        self._placed = True

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._place_before_reporters()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._place_before_reporters()
        if not self.enabled or model is None:
            return
        self.recorder = RouterStatsRecorder(model, self.adapter_name)
        if not self.recorder.layers:
            logger.warning("RouterStatsCallback found no MoDE layer with a router; nothing will be recorded.")
            self.recorder = None
            return
        self.recorder.attach()

    def _output_dir(self, args: TrainingArguments) -> Path:
        return Path(self.output_dir or args.output_dir)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self.recorder is None or logs is None:
            return
        self.recorder.all_reduce()
        summary = self.recorder.summary()
        self.recorder.reset()
        if summary["overall"] is None:
            return
        entries = flatten_for_logs(summary, self.detail)
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
        if state.is_world_process_zero:
            output_dir = self._output_dir(args)
            output_dir.mkdir(parents=True, exist_ok=True)
            with open(output_dir / STATS_FILE, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **summary}) + "\n")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if self.recorder is not None:
            self.recorder.detach()
            self.recorder = None
        if not self.enabled or self.per_task_dataset is None or model is None or not state.is_world_process_zero:
            return
        self.task_usage = routing_usage_by_task(
            model,
            self.per_task_dataset,
            self.collator,
            batch_size=self.batch_size,
            max_batches_per_task=self.max_batches_per_task,
            adapter_name=self.adapter_name,
        )
        written = write_task_usage(self.task_usage, self._output_dir(args), self.heatmap_layer)
        logger.info("Wrote the routing usage per task to %s.", ", ".join(str(path) for path in written.values()))
