"""Command-line entries of the comparison: ``compare``, ``compare-report`` and ``budget``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..experiment import ConfigError


def add_compare_commands(commands) -> None:
    """Add the comparison subcommands to the ``peft-mode`` parser."""
    compare = commands.add_parser(
        "compare", help="Train and evaluate a grid of adapters at matched budgets, then write the report."
    )
    compare.add_argument("--config", required=True, help="Comparison YAML (an experiment config plus 'comparison').")
    compare.add_argument("--sni-dir", help="Root of a natural-instructions checkout.")
    compare.add_argument("--output-dir", required=True, help="Folder of the grid; reuse it to resume.")
    compare.add_argument("--report-dir", help="Where to write results.md, results.json and figures (default: output dir).")
    compare.add_argument("--model", help="Base model instead of the config's.")
    compare.add_argument("--notes", help="Markdown file whose text goes under the report's title.")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="Override a shared experiment value (repeatable).")
    compare.set_defaults(handler=_compare)

    report = commands.add_parser("compare-report", help="Write the report of a comparison folder again.")
    report.add_argument("--output-dir", required=True, help="Folder of the grid.")
    report.add_argument("--report-dir", help="Where to write the report (default: output dir).")
    report.add_argument("--command", default="", help="Command line to quote in the report.")
    report.add_argument("--notes", help="Markdown file whose text goes under the report's title.")
    report.set_defaults(handler=_report)

    budget = commands.add_parser("budget", help="Propose LoRA, MoLoRA, MoLoRA-SD and MoDE sizes for a parameter budget.")
    budget.add_argument("--model", default="smollm2-135m-instruct", help="Model whose layer shapes are counted.")
    budget.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="Names of the adapted modules (default: q_proj k_proj v_proj o_proj).")
    target = budget.add_mutually_exclusive_group(required=True)
    target.add_argument("--parameters", type=float, help="Budget in trainable parameters, e.g. 3.7e6.")
    target.add_argument("--like", help="Budget of a reference adapter: lora:R, molora:MxR, molora_sd:MxR or mode:MxRxP.")
    budget.add_argument("--tolerance", type=float, default=0.03, help="Allowed relative distance (default 0.03).")
    budget.add_argument("--top", type=int, default=6, help="Proposals shown per method (default 6).")
    budget.set_defaults(handler=_budget)


def _hardware_text() -> str:
    from ..training.run import hardware_description

    hardware = hardware_description()
    accelerator = hardware["cuda"] or "no GPU"
    return (f"{hardware['processor']}, {hardware['cpu_count']} CPU cores, {accelerator}, torch {hardware['torch']}, "
            f"{hardware['platform']}")


def _compare(args: argparse.Namespace) -> int:
    from ..models import load_model_and_tokenizer
    from ..training.run import resolve_sni_dir, run_experiment
    from .grid import adapter_parameter_counts, check_budgets, load_comparison_config, run_grid
    from .report import write_report

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    comparison = load_comparison_config(args.config, overrides)
    first = comparison.run_config(comparison.adapters[0], comparison.seeds[0])
    resolve_sni_dir(first, args.sni_dir)
    comparison.experiment.setdefault("data", {})["sni_dir"] = first.data.sni_dir

    model, tokenizer = load_model_and_tokenizer(first.model)
    counts = adapter_parameter_counts(comparison, model)
    check_budgets(counts, comparison.budget_tolerance)
    for adapter in comparison.adapters:
        print(f"{adapter.name:24s} {adapter.label():22s} {counts[adapter.name]:>12,} trainable parameters")
    del model

    def run_one(config, directory: Path):
        fresh_model, fresh_tokenizer = load_model_and_tokenizer(config.model)
        return run_experiment(config, directory, model=fresh_model, tokenizer=fresh_tokenizer)

    status = run_grid(comparison, args.output_dir, run_one)
    print(f"Ran {len(status.completed)} runs, skipped {len(status.skipped)} complete ones.")
    command = "peft-mode " + " ".join(shlex.quote(argument) for argument in sys.argv[1:])
    written = write_report(args.output_dir, args.report_dir or args.output_dir, command, _hardware_text(),
                           notes=_read_notes(args.notes))
    print(f"Report written to {written['markdown']}")
    return 0


def _read_notes(path) -> str:
    if path is None:
        return ""
    notes = Path(path)
    if not notes.is_file():
        raise ConfigError(f"Notes file {notes} does not exist.")
    return notes.read_text()


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    written = write_report(args.output_dir, args.report_dir or args.output_dir, args.command, _hardware_text(),
                           notes=_read_notes(args.notes))
    print(f"Report written to {written['markdown']}")
    return 0


def parse_reference(text: str) -> tuple[str, int, int, int]:
    """Parse ``lora:32``, ``molora:7x4``, ``molora_sd:7x8`` or ``mode:5x8x2`` into (method, r, m, p)."""
    method, _, size = text.partition(":")
    parts = size.split("x") if size else []
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    shapes = {"lora": 1, "molora": 2, "molora_sd": 2, "mode": 3}
    if method not in shapes or len(numbers) != shapes[method]:
        raise ConfigError(
            f"--like {text!r} must be lora:R, molora:MxR, molora_sd:MxR or mode:MxRxP, e.g. mode:5x8x2."
        )
    if method == "lora":
        return method, numbers[0], 1, numbers[0]
    if method == "mode":
        return method, numbers[1], numbers[0], numbers[2]
    return method, numbers[1], numbers[0], numbers[1]


def _budget(args: argparse.Namespace) -> int:
    from ..budget import layer_shapes, propose_matching_configs, total_parameter_count
    from ..models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model)
    shapes = layer_shapes(model, args.target_modules)
    base_parameters = sum(parameter.numel() for parameter in model.parameters())
    if args.like:
        method, r, m, p = parse_reference(args.like)
        budget = total_parameter_count(shapes, method, r, m, p)
    else:
        budget = int(args.parameters)
    print(f"{len(shapes)} adapted layers; budget {budget:,} parameters ({100 * budget / base_parameters:.2f}% of the model)")
    print("Sizes read: lora r=R; molora and molora_sd MxR (M experts of rank R); mode MxRxP (M experts,"
          " rank R, expert rank P).")
    proposals = propose_matching_configs(shapes, budget, args.tolerance)
    for method, specs in proposals.items():
        print(f"\n{method}:")
        if not specs:
            print(f"  nothing within {100 * args.tolerance:.0f}%")
        for spec in specs[: args.top]:
            print(f"  {spec.describe():18s} {spec.parameters:>12,} ({100 * (spec.parameters / budget - 1):+.1f}%)")
    return 0
