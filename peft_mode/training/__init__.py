"""Training helpers: the router-statistics callback, the Trainer subclass and whole runs."""

from .callback import RouterStatsCallback, routing_usage_by_task, write_task_usage
from .router_stats import RouterStatsRecorder, flatten_for_logs
from .trainer import TargetLogitsTrainer, logits_only_at, next_token_positions, selected_token_loss

__all__ = [
    "RouterStatsCallback",
    "RouterStatsRecorder",
    "TargetLogitsTrainer",
    "flatten_for_logs",
    "logits_only_at",
    "next_token_positions",
    "routing_usage_by_task",
    "selected_token_loss",
    "write_task_usage",
]
