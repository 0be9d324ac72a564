"""Experiment settings read from YAML files, with ``section.key=value`` overrides.

A config file has the sections ``data``, ``adapter``, ``training``, ``evaluation`` and
``router_stats`` and the top-level key ``model``. Every key has a default, so a file
lists only what it changes. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.sni import DEFAULT_PROMPT_TEMPLATE
from .data.tokenization import validate_prompt_template

ADAPTER_METHODS = ("mode", "molora", "molora_sd", "lora")


class ConfigError(ValueError):
    """Raised for an unreadable config file, an unknown key or an invalid value."""


@dataclass
class DataSettings:
    """Settings of the SNI task selection, the train/eval split and the prompts."""

    sni_dir: Optional[str] = None
    tasks: Union[list[str], str] = "split:splits/default/train_tasks.txt"
    instances_per_task: Optional[int] = None
    eval_fraction: float = 0.1
    split_seed: int = 42
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    max_source_length: int = 320
    max_target_length: int = 128


@dataclass
class AdapterSettings:
    """The adapter: ``method`` is mode, molora, molora_sd or lora; the rest are its sizes.

    ``share_down_projection`` applies to mode only. Null means the method's own choice:
    shared for mode and molora_sd, one per expert for molora.
    """

    method: str = "mode"
    r: int = 8
    num_experts: int = 4
    expert_rank: int = 1
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    router_init_scale: float = 0.01
    top_k: Optional[int] = None
    share_down_projection: Optional[bool] = None


@dataclass
class TrainingSettings:
    """Hugging Face Trainer settings (same names as `transformers.TrainingArguments`)."""

    max_steps: int = 200
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: Optional[int] = None
    seed: int = 0
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    target_only_logits: bool = True
    bf16: Union[bool, str] = "auto"
    report_to: list[str] = field(default_factory=list)
    dataloader_num_workers: int = 0


@dataclass
class EvaluationSettings:
    """Greedy generation on each task's eval split, scored with ROUGE-L."""

    enabled: bool = True
    max_new_tokens: int = 128
    batch_size: int = 16
    max_instances_per_task: Optional[int] = None
    bf16: Union[bool, str] = "auto"


@dataclass
class RouterStatsSettings:
    """`RouterStatsCallback` settings."""

    enabled: bool = True
    detail: str = "overall"
    heatmap_layer: Optional[str] = None
    max_batches_per_task: int = 2


@dataclass
class ExperimentConfig:
    """A whole training and evaluation run."""

    model: str = "smollm2-135m-instruct"
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    router_stats: RouterStatsSettings = field(default_factory=RouterStatsSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        """Write the settings as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {
    "data": DataSettings,
    "adapter": AdapterSettings,
    "training": TrainingSettings,
    "evaluation": EvaluationSettings,
    "router_stats": RouterStatsSettings,
}


def _field_names(cls) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def _build_section(name: str, cls, values: Any) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"Config section {name!r} must be a mapping of keys to values, got {values!r}.")
    unknown = sorted(set(values) - set(_field_names(cls)))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in section {name!r}; valid keys: {_field_names(cls)}.")
    return cls(**values)


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an `ExperimentConfig` from nested dicts."""
    if not isinstance(values, dict):
        raise ConfigError(f"A config must be a mapping at the top level, got {type(values).__name__}.")
    unknown = sorted(set(values) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"Unknown top-level key(s) {unknown}; valid keys: {['model', *SECTIONS]}.")
    sections = {name: _build_section(name, cls, values.get(name)) for name, cls in SECTIONS.items()}
    config = ExperimentConfig(model=values.get("model", ExperimentConfig.model), **sections)
    validate(config)
    return config


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"Override {text!r} must have the form section.key=value, e.g. training.max_steps=50.")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"Override {text!r}: the value is not valid YAML ({error}).") from error
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` overrides (values parsed as YAML) in nested dicts."""
    for text in overrides:
        path, value = _parse_override(text)
        if len(path) == 1 and path[0] == "model":
            values["model"] = value
            continue
        if len(path) != 2 or path[0] not in SECTIONS:
            raise ConfigError(
                f"Override {text!r} must name a section and a key: one of {sorted(SECTIONS)} then a key, "
                "or 'model'."
            )
        section = values.setdefault(path[0], {}) or {}
        values[path[0]] = section
        section[path[1]] = value
    return values


def load_experiment_config(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read a YAML config file (or the defaults when None) and apply overrides.

    Raises:
        ConfigError: the file is missing or invalid, or a key or value is not allowed.
    """
    values: dict[str, Any] = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"Config file {config_path} does not exist.")
        try:
            values = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {config_path} is not valid YAML: {error}") from error
    return config_from_dict(apply_overrides(values, overrides or []))


def shares_down_projection(method: str, share_down_projection: Optional[bool]) -> bool:
    """Return whether ``method`` uses one down-projection for all experts. An explicit setting wins."""
    if share_down_projection is not None:
        return share_down_projection
    return method != "molora"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: ExperimentConfig) -> None:
    """Check value ranges that would otherwise fail deep inside a run."""
    _validate_adapter(config.adapter)
    _validate_data(config.data)
    _validate_run(config)


def _validate_adapter(adapter: AdapterSettings) -> None:
    _require(adapter.method in ADAPTER_METHODS, f"adapter.method must be one of {ADAPTER_METHODS}, got {adapter.method!r}.")
    for key in ("r", "num_experts", "expert_rank"):
        value = getattr(adapter, key)
        _require(isinstance(value, int) and value >= 1, f"adapter.{key} must be a positive integer, got {value!r}.")
    _require(
        adapter.method != "mode" or adapter.r % adapter.expert_rank == 0,
        f"adapter.expert_rank={adapter.expert_rank} must divide adapter.r={adapter.r}.",
    )
    share = adapter.share_down_projection
    _require(
        share is None or isinstance(share, bool),
        f"adapter.share_down_projection must be true, false or null, got {share!r}.",
    )
    _require(
        share is None or adapter.method == "mode",
        f"adapter.share_down_projection={share} applies to method mode only, got method {adapter.method!r}; "
        "molora always has one down-projection per expert and molora_sd a shared one, so remove the key.",
    )
    if adapter.top_k is not None:
        _require(
            adapter.method != "lora",
            f"adapter.top_k={adapter.top_k} applies to routed adapters only; remove it or pick method mode, molora "
            "or molora_sd.",
        )
        _require(
            isinstance(adapter.top_k, int) and 1 <= adapter.top_k <= adapter.num_experts,
            f"adapter.top_k must be an integer from 1 to adapter.num_experts={adapter.num_experts}, "
            f"got {adapter.top_k!r}.",
        )


def _validate_data(data: DataSettings) -> None:
    _require(0 < data.eval_fraction < 1, f"data.eval_fraction must be between 0 and 1, got {data.eval_fraction}.")
    _require(isinstance(data.tasks, (list, str)), f"data.tasks must be a list of task names or 'split:<file>', got {data.tasks!r}.")
    _require(
        data.instances_per_task is None or data.instances_per_task >= 2,
        f"data.instances_per_task must be at least 2 or null, got {data.instances_per_task}.",
    )
    _require(data.max_source_length >= 32, f"data.max_source_length must be at least 32, got {data.max_source_length}.")
    _require(data.max_target_length >= 2, f"data.max_target_length must be at least 2, got {data.max_target_length}.")
    try:
        validate_prompt_template(data.prompt_template)
    except ValueError as error:
        raise ConfigError(f"data.{error}") from error


def _validate_run(config: ExperimentConfig) -> None:
    training = config.training
    for section in ("training", "evaluation"):
        value = getattr(config, section).bf16
        _require(value in (True, False, "auto"), f"{section}.bf16 must be true, false or auto, got {value!r}.")
    _require(training.max_steps >= 1, f"training.max_steps must be at least 1, got {training.max_steps}.")
    _require(training.learning_rate > 0, f"training.learning_rate must be positive, got {training.learning_rate}.")
    _require(
        training.per_device_train_batch_size >= 1,
        f"training.per_device_train_batch_size must be at least 1, got {training.per_device_train_batch_size}.",
    )
    _require(config.evaluation.batch_size >= 1, f"evaluation.batch_size must be at least 1, got {config.evaluation.batch_size}.")
    _require(
        config.router_stats.detail in ("overall", "layer", "slot"),
        f"router_stats.detail must be 'overall', 'layer' or 'slot', got {config.router_stats.detail!r}.",
    )
