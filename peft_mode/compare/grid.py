"""A resumable grid of adapter runs on the same data, seeds, steps and evaluation.

A comparison config is an experiment config (see `peft_mode.experiment`) plus a
``comparison`` section::

    comparison:
      seeds: [0, 1]
      budget_tolerance: 0.05          # every adapter within 5 % of the first one's parameters
      adapters:
        - {name: lora-r32, method: lora, r: 32}
        - {name: mode-5x8x2, method: mode, r: 8, num_experts: 5, expert_rank: 2}

Each (adapter, seed) run goes to ``<output>/runs/<name>/seed-<seed>/`` and is complete
when its ``run.json`` and ``eval.json`` exist. ``<output>/comparison.json`` records a
fingerprint of the settings that determine the results. A later call with the same
output folder skips complete runs and repeats incomplete ones from the start. It raises
an error if the settings changed, so results of different configs never mix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from ..budget import METHODS, layer_shapes, total_parameter_count
from ..experiment import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, shares_down_projection

logger = logging.getLogger(__name__)

MANIFEST = "comparison.json"
EXTRA_ADAPTER_KEYS = ("alpha", "dropout", "router_init_scale", "top_k", "share_down_projection")
ADAPTER_KEYS = {"name", "method", "r", "num_experts", "expert_rank", *EXTRA_ADAPTER_KEYS}


@dataclass
class AdapterEntry:
    """One adapter of the grid."""

    name: str
    method: str
    r: int
    num_experts: int = 1
    expert_rank: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def adapter_overrides(self) -> dict[str, Any]:
        settings = {"method": self.method, "r": self.r, "num_experts": self.num_experts,
                    "expert_rank": self.expert_rank or self.r}
        settings.update(self.extra)
        return settings

    def label(self) -> str:
        if self.method == "lora":
            return f"LoRA r={self.r}"
        if self.method == "molora":
            return f"MoLoRA {self.num_experts}x{self.r}"
        if self.method == "molora_sd":
            return f"MoLoRA-SD {self.num_experts}x{self.r}"
        label = f"MoDE {self.num_experts}x{self.r}x{self.expert_rank}"
        return label if self.shares_down_projection else label + " (per-expert A)"

    @property
    def shares_down_projection(self) -> bool:
        """Whether the adapter uses one down-projection for all experts."""
        return shares_down_projection(self.method, self.extra.get("share_down_projection"))


@dataclass
class ComparisonConfig:
    """The experiment shared by all runs, the adapters and the seeds."""

    experiment: dict[str, Any]
    adapters: list[AdapterEntry]
    seeds: list[int]
    budget_tolerance: float = 0.05

    def run_config(self, adapter: AdapterEntry, seed: int) -> ExperimentConfig:
        values = copy.deepcopy(self.experiment)
        values.setdefault("adapter", {})
        values["adapter"].update(adapter.adapter_overrides())
        values.setdefault("training", {})["seed"] = seed
        return config_from_dict(values)

    def fingerprint(self) -> str:
        """Hash of the shared experiment settings, which determine every run's result.

        The seeds and adapters are checked one by one instead, so a grid can grow. The SNI
        folder's location is left out: the same data may sit at another path on resume.
        """
        settings = copy.deepcopy(self.experiment)
        settings.get("data", {}).pop("sni_dir", None)
        payload = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parse_adapter(entry: Any, index: int) -> AdapterEntry:
    if not isinstance(entry, dict):
        raise ConfigError(f"comparison.adapters[{index}] must be a mapping, got {entry!r}.")
    unknown = sorted(set(entry) - ADAPTER_KEYS)
    if unknown:
        raise ConfigError(f"comparison.adapters[{index}] has unknown key(s) {unknown}; valid keys: {sorted(ADAPTER_KEYS)}.")
    for key in ("name", "method", "r"):
        if key not in entry:
            raise ConfigError(f"comparison.adapters[{index}] needs {key!r}.")
    if entry["method"] not in METHODS:
        raise ConfigError(f"comparison.adapters[{index}].method must be one of {METHODS}, got {entry['method']!r}.")
    name = str(entry["name"])
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"comparison.adapters[{index}].name {name!r} must be a plain folder name.")
    extra = {key: entry[key] for key in EXTRA_ADAPTER_KEYS if key in entry}
    method = entry["method"]
    num_experts = 1 if method == "lora" else int(entry.get("num_experts", 4))
    expert_rank = entry.get("expert_rank") if method == "mode" else None
    return AdapterEntry(name, method, int(entry["r"]), num_experts, expert_rank, extra)


def load_comparison_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> ComparisonConfig:
    """Read a comparison YAML file; experiment overrides use the ``section.key=value`` form."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"Comparison config {config_path} does not exist.")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Comparison config {config_path} is not valid YAML: {error}") from error
    section = values.pop("comparison", None)
    if not isinstance(section, dict):
        raise ConfigError(f"{config_path} needs a 'comparison' section with 'adapters' and 'seeds'.")
    unknown = sorted(set(section) - {"adapters", "seeds", "budget_tolerance"})
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in section 'comparison'; valid keys: adapters, seeds, budget_tolerance.")
    adapters = [_parse_adapter(entry, index) for index, entry in enumerate(section.get("adapters") or [])]
    if len(adapters) < 2:
        raise ConfigError("comparison.adapters must list at least two adapters to compare.")
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"comparison.adapters names must be unique, got {names}.")
    seeds = section.get("seeds", [0, 1])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"comparison.seeds must be a non-empty list of integers, got {seeds!r}.")
    experiment = apply_overrides(values, overrides or [])
    comparison = ComparisonConfig(experiment, adapters, seeds, float(section.get("budget_tolerance", 0.05)))
    for index, adapter in enumerate(adapters):
        # Building the run config validates the adapter's settings, so name the entry in any error.
        try:
            comparison.run_config(adapter, seeds[0])
        except ConfigError as error:
            raise ConfigError(f"comparison.adapters[{index}] ({adapter.name}): {error}") from error
    return comparison


def adapter_parameter_counts(comparison: ComparisonConfig, model) -> dict[str, int]:
    """Count each adapter's trainable parameters on ``model`` with the closed-form formulas."""
    targets = comparison.run_config(comparison.adapters[0], comparison.seeds[0]).adapter.target_modules
    if isinstance(targets, str):
        raise ConfigError("Budget matching needs adapter.target_modules as a list of module names, not a pattern.")
    shapes = layer_shapes(model, targets)
    return {
        adapter.name: total_parameter_count(
            shapes, adapter.method, adapter.r, adapter.num_experts, adapter.expert_rank, adapter.shares_down_projection
        )
        for adapter in comparison.adapters
    }


def check_budgets(counts: dict[str, int], tolerance: float) -> None:
    """Raise `ConfigError` unless every adapter is within ``tolerance`` of the first adapter's count."""
    reference_name, reference = next(iter(counts.items()))
    outside = {
        name: count for name, count in counts.items() if abs(count - reference) > tolerance * reference
    }
    if outside:
        details = ", ".join(f"{name}: {count:,} ({100 * (count / reference - 1):+.1f}%)" for name, count in outside.items())
        raise ConfigError(
            f"Adapters outside the {100 * tolerance:.0f}% budget of {reference_name} ({reference:,} parameters): "
            f"{details}. Choose sizes with 'peft-mode budget' or raise comparison.budget_tolerance."
        )


RunFunction = Callable[[ExperimentConfig, Path], Any]


@dataclass
class GridStatus:
    """Runs that `run_grid` completed and skipped, as (adapter name, seed) pairs."""

    completed: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)


def run_directory(output_dir: Path, adapter: AdapterEntry, seed: int) -> Path:
    return output_dir / "runs" / adapter.name / f"seed-{seed}"


def is_complete(directory: Path) -> bool:
    return (directory / "run.json").is_file() and (directory / "eval.json").is_file()


def _check_manifest(output_dir: Path, comparison: ComparisonConfig) -> dict[str, Any]:
    manifest_path = output_dir / MANIFEST
    fingerprint = comparison.fingerprint()
    adapters = {adapter.name: adapter.adapter_overrides() for adapter in comparison.adapters}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{output_dir} contains a comparison with different settings (fingerprint {manifest.get('fingerprint')}, "
                f"now {fingerprint}). Use a new --output-dir, or delete {output_dir} to start over."
            )
        for name, settings in adapters.items():
            previous = manifest.get("adapters", {}).get(name)
            if previous is not None and previous != settings:
                raise ConfigError(
                    f"Adapter {name!r} in {output_dir} was run with {previous}, but the config now sets {settings}. "
                    "Give the changed adapter a new name or use a new --output-dir."
                )
        manifest["adapters"] = {**manifest.get("adapters", {}), **adapters}
        manifest["seeds"] = sorted(set(manifest.get("seeds", [])) | set(comparison.seeds))
    else:
        manifest = {"fingerprint": fingerprint, "experiment": comparison.experiment, "adapters": adapters,
                    "seeds": comparison.seeds}
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def run_grid(comparison: ComparisonConfig, output_dir: Union[str, Path], run_function: RunFunction) -> GridStatus:
    """Run every (adapter, seed) pair that is not complete yet, in config order.

    Args:
        comparison: the grid.
        output_dir: folder for all runs and the manifest.
        run_function: trains and evaluates one run, called as ``run_function(config, run_dir)``.
    """
    output_dir = Path(output_dir)
    _check_manifest(output_dir, comparison)
    status = GridStatus()
    for seed in comparison.seeds:
        for adapter in comparison.adapters:
            directory = run_directory(output_dir, adapter, seed)
            if is_complete(directory):
                logger.info("Skipping %s seed %d: already complete in %s.", adapter.name, seed, directory)
                status.skipped.append((adapter.name, seed))
                continue
            if directory.exists():
                logger.info("Removing the incomplete run in %s and starting it again.", directory)
                shutil.rmtree(directory)
            logger.info("Running %s (%s) with seed %d.", adapter.name, adapter.label(), seed)
            run_function(comparison.run_config(adapter, seed), directory)
            status.completed.append((adapter.name, seed))
    return status
