"""The comparison report: tables, pairwise win rates with significance tests, and plots.

Inputs are the run folders written by `run_grid`; nothing is recomputed from models.
Definitions used in the report:

- overall ROUGE-L of a run: the mean over all eval instances. A method's score is the
  mean over seeds, and its spread is the sample standard deviation and the range over seeds;
- per-task win rate of A over B: the share of tasks on which A's seed-mean ROUGE-L is
  higher than B's, ties counting one half;
- significance: a two-sided Wilcoxon signed-rank test on the per-task differences, and a
  two-sided sign test on the number of tasks won (ties dropped);
- a difference "exceeds the seed spread" when the two methods' ranges over seeds do not
  overlap.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from scipy import stats

from ..plots import grouped_bars
from .grid import MANIFEST

logger = logging.getLogger(__name__)

PAPER_ORDER = ("lora", "molora", "molora_sd", "mode")
PAPER_CASE_STUDY = {"lora": 57.07, "molora": 61.93, "molora_sd": 62.42, "mode": 63.39}
METHOD_NAMES = {"lora": "LoRA", "molora": "MoLoRA", "molora_sd": "MoLoRA-SD", "mode": "MoDE"}


@dataclass
class MethodResult:
    """All seeds of one adapter of the grid."""

    name: str
    label: str
    method: str
    trainable_parameters: int
    total_parameters: int
    overall_by_seed: dict[int, float] = field(default_factory=dict)
    task_scores_by_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    train_seconds_by_seed: dict[int, float] = field(default_factory=dict)
    eval_seconds_by_seed: dict[int, float] = field(default_factory=dict)
    run_dirs: dict[int, Path] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.overall_by_seed.values())

    @property
    def std(self) -> float:
        values = list(self.overall_by_seed.values())
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def seed_range(self) -> tuple[float, float]:
        return min(self.overall_by_seed.values()), max(self.overall_by_seed.values())

    def task_means(self) -> dict[str, float]:
        tasks = next(iter(self.task_scores_by_seed.values())).keys()
        return {task: statistics.fmean(scores[task] for scores in self.task_scores_by_seed.values()) for task in tasks}


def _label(method: str, settings: dict[str, Any]) -> str:
    if method == "lora":
        return f"LoRA r={settings['r']}"
    size = f"{settings['num_experts']}x{settings['r']}"
    if method == "mode":
        return f"MoDE {size}x{settings['expert_rank']}"
    return f"{METHOD_NAMES[method]} {size}"


def collect_results(output_dir: Union[str, Path]) -> list[MethodResult]:
    """Read every complete run of a comparison folder, in the manifest's adapter order."""
    output_dir = Path(output_dir)
    manifest_path = output_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{output_dir} has no {MANIFEST}; pass the --output-dir of 'peft-mode compare'.")
    manifest = json.loads(manifest_path.read_text())
    results = []
    for name, settings in manifest["adapters"].items():
        method = settings["method"]
        result: Optional[MethodResult] = None
        for seed_dir in sorted((output_dir / "runs" / name).glob("seed-*")):
            if not ((seed_dir / "run.json").is_file() and (seed_dir / "eval.json").is_file()):
                continue
            seed = int(seed_dir.name.removeprefix("seed-"))
            run = json.loads((seed_dir / "run.json").read_text())
            evaluation = json.loads((seed_dir / "eval.json").read_text())
            if result is None:
                result = MethodResult(name, _label(method, settings), method, run["trainable_parameters"],
                                      run["total_parameters"])
            result.overall_by_seed[seed] = evaluation["overall"]
            result.task_scores_by_seed[seed] = evaluation["per_task"]
            result.train_seconds_by_seed[seed] = run["train_seconds"]
            result.eval_seconds_by_seed[seed] = run.get("eval_seconds", 0.0)
            result.run_dirs[seed] = seed_dir
        if result is not None:
            results.append(result)
    if not results:
        raise FileNotFoundError(f"No complete runs under {output_dir / 'runs'}.")
    return results


@dataclass
class PairwiseResult:
    first: str
    second: str
    win_rate: float
    wins: int
    losses: int
    ties: int
    wilcoxon_p: Optional[float]
    sign_test_p: Optional[float]
    mean_difference: float


def pairwise(first: MethodResult, second: MethodResult) -> PairwiseResult:
    """Per-task win rate of ``first`` over ``second`` with the Wilcoxon and sign tests."""
    first_tasks, second_tasks = first.task_means(), second.task_means()
    differences = [first_tasks[task] - second_tasks[task] for task in first_tasks]
    wins = sum(difference > 0 for difference in differences)
    losses = sum(difference < 0 for difference in differences)
    ties = len(differences) - wins - losses
    nonzero = [difference for difference in differences if difference != 0]
    wilcoxon_p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else None
    sign_test_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses > 0 else None
    return PairwiseResult(
        first.name, second.name, (wins + 0.5 * ties) / len(differences), wins, losses, ties, wilcoxon_p, sign_test_p,
        statistics.fmean(differences),
    )


def best_of_each_method(results: list[MethodResult]) -> dict[str, MethodResult]:
    """The adapter with the highest mean score for each method present."""
    best: dict[str, MethodResult] = {}
    for result in results:
        if result.method not in best or result.mean > best[result.method].mean:
            best[result.method] = result
    return best


def paper_order_statement(results: list[MethodResult]) -> list[str]:
    """Return sentences that compare the method order with the MoDE paper's case study and the gaps with the seed spread.

    The paper's figures (Gemma 2B, 15 SNI tasks, mixed-task training) are ROUGE-L 57.07 for
    LoRA, 61.93 for MoLoRA, 62.42 for MoLoRA-SD and 63.39 for MoDE (Ning et al., 2025,
    https://arxiv.org/abs/2408.01505).
    """
    best = best_of_each_method(results)
    present = [method for method in PAPER_ORDER if method in best]
    observed = sorted(present, key=lambda method: best[method].mean)
    lines = []
    paper_text = " < ".join(f"{METHOD_NAMES[m]} ({PAPER_CASE_STUDY[m]:.2f})" for m in present)
    observed_text = " < ".join(f"{METHOD_NAMES[m]} ({best[m].mean:.2f})" for m in observed)
    same = observed == present
    lines.append(f"Paper case study (Gemma 2B, 15 tasks), mixed-task ROUGE-L: {paper_text}.")
    lines.append(f"This run, best configuration of each method: {observed_text}.")
    lines.append("The order is the same as in the paper." if same else "The order differs from the paper's.")
    for lower, higher in zip(present, present[1:]):
        a, b = best[lower], best[higher]
        overlap = not (a.seed_range[1] < b.seed_range[0] or b.seed_range[1] < a.seed_range[0])
        verdict = "within the seed spread (the seed ranges overlap)" if overlap else "larger than the seed spread"
        lines.append(
            f"{b.label} minus {a.label}: {b.mean - a.mean:+.2f} ROUGE-L, {verdict}; "
            f"seed ranges {a.seed_range[0]:.2f} to {a.seed_range[1]:.2f} and {b.seed_range[0]:.2f} to {b.seed_range[1]:.2f}."
        )
    return lines


def _format_p(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def build_report(results: list[MethodResult], title: str, command: str, hardware: str) -> tuple[str, dict[str, Any]]:
    """Return the Markdown report and the matching JSON data."""
    tasks = list(next(iter(results[0].task_scores_by_seed.values())).keys())
    seeds = sorted({seed for result in results for seed in result.overall_by_seed})
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Hardware: {hardware}", ""]
    lines += ["## Overall ROUGE-L", ""]
    lines += ["| adapter | trainable params | % of base | ROUGE-L mean | std | per seed | train time per run | eval time per run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        per_seed = ", ".join(f"{result.overall_by_seed[seed]:.2f}" for seed in sorted(result.overall_by_seed))
        share = 100 * result.trainable_parameters / (result.total_parameters - result.trainable_parameters)
        lines.append(
            f"| {result.label} | {result.trainable_parameters:,} | {share:.2f}% | {result.mean:.2f} | {result.std:.2f} | "
            f"{per_seed} | {statistics.fmean(result.train_seconds_by_seed.values()) / 60:.1f} min | "
            f"{statistics.fmean(result.eval_seconds_by_seed.values()) / 60:.1f} min |"
        )
    lines += ["", "### Compared with the paper", ""] + [f"- {line}" for line in paper_order_statement(results)]

    lines += ["", "## Per-task ROUGE-L (mean over seeds)", ""]
    lines += ["| task | " + " | ".join(result.label for result in results) + " |",
              "| --- |" + " --- |" * len(results)]
    task_means = {result.name: result.task_means() for result in results}
    for task in tasks:
        scores = [task_means[result.name][task] for result in results]
        top = max(scores)
        cells = [f"**{score:.2f}**" if score == top else f"{score:.2f}" for score in scores]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")

    pairs = [pairwise(a, b) for index, a in enumerate(results) for b in results[index + 1:]]
    labels = {result.name: result.label for result in results}
    lines += ["", "## Per-task win rates", "",
              f"Over {len(tasks)} tasks; p-values are two-sided (Wilcoxon signed-rank on per-task differences, "
              "sign test on tasks won).", "",
              "| A | B | A wins | B wins | ties | win rate of A | mean A - B | Wilcoxon p | sign test p |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pair in pairs:
        lines.append(
            f"| {labels[pair.first]} | {labels[pair.second]} | {pair.wins} | {pair.losses} | {pair.ties} | "
            f"{100 * pair.win_rate:.0f}% | {pair.mean_difference:+.2f} | {_format_p(pair.wilcoxon_p)} | "
            f"{_format_p(pair.sign_test_p)} |"
        )

    data = {
        "title": title,
        "command": command,
        "hardware": hardware,
        "seeds": seeds,
        "methods": [
            {"name": r.name, "label": r.label, "method": r.method, "trainable_parameters": r.trainable_parameters,
             "total_parameters": r.total_parameters, "overall_by_seed": r.overall_by_seed, "mean": r.mean, "std": r.std,
             "task_means": r.task_means(), "train_seconds_by_seed": r.train_seconds_by_seed,
             "eval_seconds_by_seed": r.eval_seconds_by_seed}
            for r in results
        ],
        "pairwise": [pair.__dict__ for pair in pairs],
        "paper_comparison": paper_order_statement(results),
    }
    return "\n".join(lines) + "\n", data


def write_report(
    output_dir: Union[str, Path],
    report_dir: Union[str, Path],
    command: str = "",
    hardware: str = "",
    title: str = "LoRA, MoLoRA, MoLoRA-SD and MoDE at matched parameter budgets",
    name: str = "results",
    notes: str = "",
) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.json`` and figures for the comparison in ``output_dir``.

    ``notes`` (Markdown) is placed under the title, for the setup and caveats of the run.
    """
    results = collect_results(output_dir)
    report_dir = Path(report_dir)
    figures = report_dir / "figures"
    markdown, data = build_report(results, title, command, hardware)
    if notes:
        heading, _, rest = markdown.partition("\n\n")
        markdown = f"{heading}\n\n{notes.strip()}\n\n{rest}"

    tasks = list(results[0].task_means())
    per_task = grouped_bars(
        tasks, {r.label: [r.task_means()[task] for task in tasks] for r in results},
        figures / f"{name}-per-task.png", "ROUGE-L per task (mean over seeds)", "ROUGE-L",
    )
    overall = grouped_bars(
        ["overall"], {r.label: [r.mean] for r in results}, figures / f"{name}-overall.png",
        "Overall ROUGE-L (mean over seeds, error bar: standard deviation)", "ROUGE-L",
        errors={r.label: [r.std] for r in results},
    )
    written = {"per_task_plot": per_task, "overall_plot": overall}
    mode_results = [r for r in results if r.method == "mode"]
    figure_lines = [f"![Overall ROUGE-L](figures/{overall.name})", "", f"![Per-task ROUGE-L](figures/{per_task.name})"]
    if mode_results:
        best = max(mode_results, key=lambda r: r.mean)
        best_seed = max(best.overall_by_seed, key=best.overall_by_seed.get)
        heatmap = best.run_dirs[best_seed] / "router_heatmap_average.png"
        if heatmap.is_file():
            target = figures / f"{name}-router-heatmap.png"
            shutil.copyfile(heatmap, target)
            written["router_heatmap"] = target
            figure_lines += ["", f"Routing per task of the best MoDE adapter ({best.label}, seed {best_seed}): mean "
                             "routing weight of each expert over each task's eval tokens, averaged over layers.", "",
                             f"![Router heatmap](figures/{target.name})"]
    markdown += "\n## Figures\n\n" + "\n".join(figure_lines) + "\n"
    written["markdown"] = report_dir / f"{name}.md"
    written["json"] = report_dir / f"{name}.json"
    written["markdown"].write_text(markdown)
    written["json"].write_text(json.dumps(data, indent=2, default=str))
    return written
