"""Generation-based evaluation with ROUGE-L, as in Super-NaturalInstructions.

Each prediction is compared with every reference output and scored with the best ROUGE-L
F-measure (x100). Before scoring both sides are lowercased, stripped of ASCII
punctuation and whitespace-normalised, and ROUGE-L uses the Porter stemmer of the
``rouge-score`` package, following the SNI evaluation (Wang et al., EMNLP 2022). The
overall score is the mean over all eval instances; the task mean is also reported.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.sni import SNIInstance
from .data.tokenization import PromptTokenizer

logger = logging.getLogger(__name__)

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_text(text: str) -> str:
    """Lowercase, remove ASCII punctuation and collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Return the best ROUGE-L F-measure (0 to 100) of ``prediction`` over ``references``."""
    if not references:
        raise ValueError("rouge_l needs at least one reference.")
    normalized_prediction = normalize_text(prediction)
    return 100.0 * max(
        _SCORER.score(normalize_text(reference), normalized_prediction)["rougeL"].fmeasure for reference in references
    )


@torch.no_grad()
def generate_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_tokenizer: PromptTokenizer,
    instances: Sequence[SNIInstance],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    show_progress: bool = True,
    bf16: bool = False,
) -> list[str]:
    """Generate greedily for each instance's prompt; return the decoded continuations in input order.

    Prompts are sorted by length and left-padded so each batch wastes little compute. With
    ``bf16`` the forward passes run under bfloat16 autocast.
    """
    device = next(model.parameters()).device
    prompts = [prompt_tokenizer.prompt_ids(item.definition, item.input) for item in instances]
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    predictions: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc="Generating", disable=not show_progress):
            longest = max(len(prompts[index]) for index in batch)
            input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = prompts[index]
                input_ids[row, longest - len(ids) :] = torch.tensor(ids)
                attention_mask[row, longest - len(ids) :] = 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row, index in enumerate(batch):
                predictions[index] = tokenizer.decode(output[row, longest:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return predictions


def score_predictions(instances: Sequence[SNIInstance], predictions: Sequence[str]) -> dict[str, Any]:
    """Score predictions and aggregate them per task and overall.

    Returns:
        ``{"overall": mean over instances, "task_mean": mean of task means, "per_task": {task: mean},
        "instances": per-instance records}``, scores in 0 to 100.
    """
    if len(instances) != len(predictions):
        raise ValueError(f"Got {len(predictions)} predictions for {len(instances)} instances.")
    if not instances:
        raise ValueError("No instances to score.")
    records = []
    per_task: dict[str, list[float]] = {}
    for instance, prediction in zip(instances, predictions):
        score = rouge_l(prediction, instance.references)
        per_task.setdefault(instance.task, []).append(score)
        records.append(
            {"task": instance.task, "id": instance.id, "prediction": prediction,
             "references": list(instance.references), "rougeL": score}
        )
    task_means = {task: sum(scores) / len(scores) for task, scores in per_task.items()}
    return {
        "overall": sum(record["rougeL"] for record in records) / len(records),
        "task_mean": sum(task_means.values()) / len(task_means),
        "per_task": task_means,
        "counts": {task: len(scores) for task, scores in per_task.items()},
        "instances": records,
    }


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_tokenizer: PromptTokenizer,
    instances: Sequence[SNIInstance],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    show_progress: bool = True,
    bf16: bool = False,
) -> dict[str, Any]:
    """Generate for every instance and score the predictions; see `score_predictions`."""
    predictions = generate_predictions(
        model, tokenizer, prompt_tokenizer, instances, batch_size, max_new_tokens, show_progress, bf16
    )
    return score_predictions(instances, predictions)


def results_table(
    results: dict[str, Any],
    baseline: Optional[dict[str, Any]] = None,
    labels: tuple[str, str] = ("baseline", "this run"),
) -> str:
    """Format per-task and overall ROUGE-L as a Markdown table, with a baseline column if given.

    ``labels`` name the baseline and the scored columns.
    """
    header = "| task | eval instances | ROUGE-L |"
    rule = "| --- | --- | --- |"
    if baseline is not None:
        header = f"| task | eval instances | {labels[0]} ROUGE-L | {labels[1]} ROUGE-L | change |"
        rule = "| --- | --- | --- | --- | --- |"
    lines = [header, rule]

    def row(name: str, count: Any, key_value: float, base_value: Optional[float]) -> str:
        if base_value is None:
            return f"| {name} | {count} | {key_value:.2f} |"
        return f"| {name} | {count} | {base_value:.2f} | {key_value:.2f} | {key_value - base_value:+.2f} |"

    for task, score in results["per_task"].items():
        base = baseline["per_task"].get(task) if baseline else None
        lines.append(row(task, results["counts"][task], score, base))
    total = sum(results["counts"].values())
    lines.append(row("**overall (mean over instances)**", total, results["overall"], baseline["overall"] if baseline else None))
    lines.append(row("**mean over tasks**", len(results["per_task"]), results["task_mean"], baseline["task_mean"] if baseline else None))
    return "\n".join(lines)


def write_results(results: dict[str, Any], output_dir: Path, name: str = "eval", baseline: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write ``<name>.json`` (with per-instance predictions) and ``<name>.md``; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{name}.json"
    markdown_path = output_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2))
    markdown_path.write_text(f"# ROUGE-L on held-out instances\n\n{results_table(results, baseline)}\n")
    return {"json": json_path, "markdown": markdown_path}
