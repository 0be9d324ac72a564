"""Super-NaturalInstructions (SNI) tasks as train and eval datasets.

Reads the layout of the public ``allenai/natural-instructions`` repository (a full
checkout or a subset of it): ``tasks/<task name>.json`` files with ``Definition`` (a
list of strings) and ``Instances`` (a list of ``{"id", "input", "output": [references]}``),
and optionally ``splits/default/train_tasks.txt``.

Each task's instances are shuffled with a seed derived from the split seed and the task
name, cut to ``instances_per_task``, and split: the last ``eval_fraction`` (at least one
instance) is held out for evaluation, as in Wang et al. (2022) and the MoDE paper. The
split depends only on the seed, the task file and these two numbers.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from datasets import Dataset

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "Definition: {definition}\n\nInput: {input}\nOutput: "
DEFAULT_SPLIT_FILE = "splits/default/train_tasks.txt"


class SNIDataError(ValueError):
    """Raised for a missing SNI folder, an unknown task, an empty task or a malformed task file."""


@dataclass(frozen=True)
class SNIInstance:
    """One instance of a task, with all of its reference outputs."""

    task: str
    id: str
    definition: str
    input: str
    references: tuple[str, ...]


def _tasks_dir(sni_dir: Union[str, Path]) -> Path:
    root = Path(sni_dir).expanduser()
    if not root.is_dir():
        raise SNIDataError(
            f"SNI folder {root} does not exist. Pass --sni-dir with a checkout of "
            "https://github.com/allenai/natural-instructions or a folder with the same layout."
        )
    tasks = root / "tasks"
    if not tasks.is_dir():
        raise SNIDataError(
            f"{root} has no tasks/ subfolder, so it is not in the natural-instructions layout "
            "(tasks/<task name>.json). Pass the repository root as --sni-dir."
        )
    return tasks


def available_tasks(sni_dir: Union[str, Path]) -> list[str]:
    """Return the names of all task files under ``sni_dir``/tasks, sorted."""
    return sorted(path.stem for path in _tasks_dir(sni_dir).glob("*.json"))


def read_split_file(sni_dir: Union[str, Path], split_file: str = DEFAULT_SPLIT_FILE) -> list[str]:
    """Return the task names listed one per line in ``split_file`` (relative to ``sni_dir``)."""
    path = Path(sni_dir).expanduser() / split_file
    if not path.is_file():
        raise SNIDataError(f"Split file {path} does not exist; list the tasks explicitly instead.")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resolve_task_names(sni_dir: Union[str, Path], requested: Sequence[str]) -> list[str]:
    """Map requested names to task file names.

    A request is an exact task name (``task024_cosmosqa_answer_generation``) or its number
    prefix (``task024``).

    Raises:
        SNIDataError: a request matches no task or several; the message lists close names.
    """
    known = available_tasks(sni_dir)
    if not known:
        raise SNIDataError(f"{_tasks_dir(sni_dir)} contains no task files (*.json).")
    known_set = set(known)
    resolved = []
    for request in requested:
        if request in known_set:
            resolved.append(request)
            continue
        prefixed = [name for name in known if name.startswith(request + "_")]
        if len(prefixed) == 1:
            resolved.append(prefixed[0])
            continue
        if len(prefixed) > 1:
            raise SNIDataError(f"Task {request!r} is ambiguous; it matches {prefixed}. Use the full task name.")
        close = difflib.get_close_matches(request, known, n=3, cutoff=0.5)
        suggestion = f" Close matches: {close}." if close else ""
        raise SNIDataError(
            f"Unknown task {request!r}: no file tasks/{request}.json in {Path(sni_dir).expanduser()}.{suggestion}"
        )
    duplicates = sorted({name for name in resolved if resolved.count(name) > 1})
    if duplicates:
        raise SNIDataError(f"Tasks listed more than once: {duplicates}. List each task once.")
    return resolved


def _string_list(value, field: str, path: Path) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SNIDataError(f"{path}: {field!r} must be a list of strings, got {type(value).__name__}.")
    return value


def load_task(sni_dir: Union[str, Path], task_name: str) -> list[SNIInstance]:
    """Read and validate one task file.

    Raises:
        SNIDataError: the file is missing, is not valid JSON, lacks ``Definition`` or
            ``Instances``, or has no usable instance.
    """
    path = _tasks_dir(sni_dir) / f"{task_name}.json"
    if not path.is_file():
        raise SNIDataError(f"Task file {path} does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SNIDataError(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}).") from error
    if not isinstance(content, dict):
        raise SNIDataError(f"{path} must contain a JSON object with 'Definition' and 'Instances'.")
    for key in ("Definition", "Instances"):
        if key not in content:
            raise SNIDataError(f"{path} has no {key!r} key; it is not an SNI task file.")

    definition = " ".join(_string_list(content["Definition"], "Definition", path)).strip()
    raw_instances = content["Instances"]
    if not isinstance(raw_instances, list):
        raise SNIDataError(f"{path}: 'Instances' must be a list, got {type(raw_instances).__name__}.")

    instances = []
    for position, raw in enumerate(raw_instances):
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str) or "output" not in raw:
            raise SNIDataError(f"{path}: instance {position} needs a string 'input' and an 'output' list.")
        references = [text for text in _string_list(raw["output"], f"Instances[{position}].output", path) if text.strip()]
        if not references:
            logger.warning("%s: skipping instance %d, which has no non-empty reference output.", path.name, position)
            continue
        instances.append(
            SNIInstance(
                task=task_name,
                id=str(raw.get("id", f"{task_name}-{position}")),
                definition=definition,
                input=raw["input"],
                references=tuple(references),
            )
        )
    if not instances:
        raise SNIDataError(f"Task {task_name} ({path}) has no usable instances; remove it from the task list.")
    return instances


def split_task(
    instances: list[SNIInstance], instances_per_task: Optional[int], eval_fraction: float, seed: int
) -> tuple[list[SNIInstance], list[SNIInstance]]:
    """Shuffle one task's instances deterministically, cap them and split them into (train, eval)."""
    if not 0.0 < eval_fraction < 1.0:
        raise SNIDataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}.")
    if len(instances) < 2:
        raise SNIDataError(
            f"Task {instances[0].task} has {len(instances)} instance; at least 2 are needed for a train/eval split."
        )
    shuffled = list(instances)
    # A string seed gives the same order on every platform and Python version (3.2 and later).
    random.Random(f"{seed}:{instances[0].task}").shuffle(shuffled)
    if instances_per_task is not None:
        shuffled = shuffled[:instances_per_task]
    eval_count = min(max(1, math.ceil(len(shuffled) * eval_fraction - 1e-9)), len(shuffled) - 1)
    return shuffled[: len(shuffled) - eval_count], shuffled[len(shuffled) - eval_count :]


@dataclass
class SNISplits:
    """Train and eval instances of all selected tasks."""

    tasks: list[str]
    train: list[SNIInstance]
    eval: list[SNIInstance]

    def eval_by_task(self) -> dict[str, list[SNIInstance]]:
        """Return the eval instances grouped by task, in task order."""
        grouped: dict[str, list[SNIInstance]] = {task: [] for task in self.tasks}
        for instance in self.eval:
            grouped[instance.task].append(instance)
        return grouped


def load_sni_splits(
    sni_dir: Union[str, Path],
    tasks: Union[Sequence[str], str],
    instances_per_task: Optional[int] = None,
    eval_fraction: float = 0.1,
    seed: int = 42,
) -> SNISplits:
    """Load the selected tasks and split each one into train and eval instances.

    Args:
        sni_dir: root of a natural-instructions checkout (or a folder with its layout).
        tasks: task names or number prefixes, and ``"split:<file>"`` entries that read names from a
            split file such as ``split:splits/default/train_tasks.txt``; a single split entry may be
            given as a string.
        instances_per_task: cap on the instances taken from each task before splitting.
        eval_fraction: share of each task's instances held out for evaluation.
        seed: seed of the per-task shuffle.
    """
    if instances_per_task is not None and instances_per_task < 2:
        raise SNIDataError(f"instances_per_task must be at least 2 (or unset), got {instances_per_task}.")
    if isinstance(tasks, str):
        if not tasks.startswith("split:"):
            raise SNIDataError(f"tasks must be a list of task names or 'split:<file>', got {tasks!r}.")
        tasks = [tasks]
    requested = []
    for entry in tasks:
        if isinstance(entry, str) and entry.startswith("split:"):
            requested.extend(read_split_file(sni_dir, entry.removeprefix("split:")))
        else:
            requested.append(entry)
    # A task named twice (by a split file and by name) is loaded once.
    requested = list(dict.fromkeys(requested))
    if not requested:
        raise SNIDataError("The task list is empty; name at least one task.")

    names = resolve_task_names(sni_dir, requested)
    train, evaluation = [], []
    for name in names:
        task_train, task_eval = split_task(load_task(sni_dir, name), instances_per_task, eval_fraction, seed)
        train.extend(task_train)
        evaluation.extend(task_eval)
    logger.info("Loaded %d tasks: %d train and %d eval instances.", len(names), len(train), len(evaluation))
    return SNISplits(tasks=names, train=train, eval=evaluation)


def instances_to_dataset(instances: Sequence[SNIInstance]) -> Dataset:
    """Return a `datasets.Dataset` with columns task, id, definition, input and references."""
    return Dataset.from_dict(
        {
            "task": [instance.task for instance in instances],
            "id": [instance.id for instance in instances],
            "definition": [instance.definition for instance in instances],
            "input": [instance.input for instance in instances],
            "references": [list(instance.references) for instance in instances],
        }
    )
