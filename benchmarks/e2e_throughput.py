"""Training throughput and peak memory of SmolLM2-135M with MoDE against iso-parametric LoRA.

Every measurement trains through the same path as ``peft-mode train`` (real SNI examples,
`TargetLogitsTrainer`, the same collator and settings) in a fresh subprocess, so peak
resident memory (``ru_maxrss``) belongs to that variant alone. Variants alternate
(LoRA, MoDE, ..., LoRA, MoDE) to spread machine drift evenly; tokens per second count
non-padding tokens over the steps after the warm-up steps.

Examples:
    python benchmarks/e2e_throughput.py --sni-dir ../shared/data/natural-instructions-subset \\
        --output docs/benchmarks/e2e-cpu.json
    python benchmarks/e2e_throughput.py --sni-dir natural-instructions --device-note "H200" --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "lora": {"adapter.method": "lora", "adapter.r": 37, "training.target_only_logits": True},
    "mode": {"adapter.method": "mode", "adapter.r": 8, "adapter.num_experts": 4, "adapter.expert_rank": 1,
             "training.target_only_logits": True},
    "mode_full_logits": {"adapter.method": "mode", "adapter.r": 8, "adapter.num_experts": 4, "adapter.expert_rank": 1,
                         "training.target_only_logits": False},
    "mode_router_stats": {"adapter.method": "mode", "adapter.r": 8, "adapter.num_experts": 4, "adapter.expert_rank": 1,
                          "training.target_only_logits": True},
}
# Variants that train with RouterStatsCallback attached (per-layer detail, logged every step).
WITH_ROUTER_STATS = {"mode_router_stats"}
TASKS = ["task024_cosmosqa_answer_generation", "task155_count_nouns_verbs", "task279_stereoset_classification_stereotype",
         "task622_replace_alphabets_in_a_list_by_their_position_in_english_alphabet"]


def measure(variant: str, sni_dir: str, steps: int, warmup: int, bf16: bool, batch_size: int) -> dict:
    """Train one variant in this process and return throughput and memory figures."""
    import torch
    from transformers import TrainerCallback

    import peft_mode  # noqa: F401
    from peft_mode.data.sni import instances_to_dataset
    from peft_mode.data.tokenization import CausalLMCollator, PromptTokenizer, tokenize_for_training
    from peft_mode.experiment import apply_overrides, config_from_dict
    from peft_mode.models import load_model_and_tokenizer
    from peft_mode.training.run import adapter_config, build_training_arguments, load_splits
    from peft_mode.training.callback import RouterStatsCallback
    from peft_mode.training.trainer import TargetLogitsTrainer
    from peft import get_peft_model

    overrides = [f"{key}={value}" for key, value in VARIANTS[variant].items()]
    logging_steps = 1 if variant in WITH_ROUTER_STATS else 1000
    overrides += [f"training.max_steps={steps}", f"training.per_device_train_batch_size={batch_size}",
                  f"training.bf16={str(bf16).lower()}", f"training.logging_steps={logging_steps}",
                  "training.group_by_length=false",
                  f"data.sni_dir={sni_dir}", f"data.tasks=[{', '.join(TASKS)}]", "data.instances_per_task=60"]
    config = config_from_dict(apply_overrides({}, overrides))
    splits = load_splits(config)
    model, tokenizer = load_model_and_tokenizer(config.model)
    prompts = PromptTokenizer(tokenizer, config.data.prompt_template, config.data.max_source_length,
                              config.data.max_target_length)
    dataset = tokenize_for_training(instances_to_dataset(splits.train), prompts)
    peft_model = get_peft_model(model, adapter_config(config.adapter))
    trainable = peft_model.get_nb_trainable_parameters()[0]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class CountingCollator(CausalLMCollator):
        tokens: list[int] = []

        def __call__(self, features):
            batch = super().__call__(features)
            CountingCollator.tokens.append(int(batch["attention_mask"].sum()))
            return batch

    timer = StepTimer()
    callbacks = [timer]
    if variant in WITH_ROUTER_STATS:
        callbacks.append(RouterStatsCallback(detail="layer"))
    collator = CountingCollator(tokenizer.pad_token_id)
    arguments = build_training_arguments(config, Path(os.environ.get("TMPDIR", "/tmp")) / f"e2e-{variant}")
    arguments.disable_tqdm = True
    arguments.report_to = []
    trainer = TargetLogitsTrainer(model=peft_model, args=arguments, train_dataset=dataset, data_collator=collator,
                                  callbacks=callbacks, target_only_logits=config.training.target_only_logits)
    trainer.train()

    # Wall time from the first measured step to the last step's end, so work between steps
    # (logging, callbacks) counts too.
    measured = range(warmup, steps)
    seconds = timer.ends[steps - 1] - timer.starts[warmup]
    tokens = sum(CountingCollator.tokens[step] for step in measured)
    return {
        "variant": variant,
        "trainable_parameters": trainable,
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / len(measured),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bf16": bf16,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sni-dir", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per variant and precision")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--device-note", default="", help="description of the machine for the report")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        variant, precision = args.child.split(":")
        print(json.dumps(measure(variant, args.sni_dir, args.steps, args.warmup, precision == "bf16", args.batch_size)))
        return 0

    runs = []
    for precision in args.precisions:
        for repeat in range(args.repeats):
            for variant in args.variants:
                command = [sys.executable, __file__, "--child", f"{variant}:{precision}", "--sni-dir", args.sni_dir,
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                           "--output", args.output]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{variant} ({precision}) failed:\n{result.stderr[-3000:]}")
                record = json.loads(result.stdout.strip().splitlines()[-1])
                record["repeat"] = repeat
                runs.append(record)
                print(f"{precision} {variant:18s} repeat {repeat}: {record['tokens_per_second']:.0f} tokens/s, "
                      f"peak {record['peak_rss_mib']:.0f} MiB")

    summary = {}
    for precision in args.precisions:
        selected = [run for run in runs if run["bf16"] == (precision == "bf16")]
        lora_rates = {run["repeat"]: run["tokens_per_second"] for run in selected if run["variant"] == "lora"}
        for variant in args.variants:
            mine = [run for run in selected if run["variant"] == variant]
            summary[f"{precision}/{variant}"] = {
                "trainable_parameters": mine[0]["trainable_parameters"],
                "tokens_per_second_median": statistics.median(run["tokens_per_second"] for run in mine),
                "ratio_to_lora_median": statistics.median(
                    run["tokens_per_second"] / lora_rates[run["repeat"]] for run in mine
                ) if lora_rates else None,
                "peak_rss_mib_median": statistics.median(run["peak_rss_mib"] for run in mine),
            }
    report = {"command": " ".join(sys.argv), "device_note": args.device_note, "runs": runs, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
