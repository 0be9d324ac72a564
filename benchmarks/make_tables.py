"""Turn benchmark JSON files into the Markdown tables of docs/performance.md.

Example:
    python benchmarks/make_tables.py --layer docs/benchmarks/layer-cpu-fp32.json \\
        --e2e docs/benchmarks/e2e-cpu.json --output docs/benchmarks/tables-cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def layer_table(report: dict) -> str:
    lines = [
        f"{report['dtype']} on {report['device']} ({report['threads']} threads, torch {report['torch']}), "
        f"{report['tokens']} tokens; ratios are medians of per-repeat ratios to iso-parametric LoRA (lower is better).",
        "",
        "| P -> Q | m | r | p | down-proj. | LoRA rank | fwd MoDE | fwd loop | fwd+bwd MoDE | fwd+bwd loop "
        "| loop / MoDE (fwd+bwd) | act. memory MoDE / LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in report["results"]:
        forward = result["forward"]["ratio_to_lora"]
        train = result["forward_backward"]["ratio_to_lora"]
        memory = result["activation_bytes"]
        lines.append(
            f"| {result['in_features']} -> {result['out_features']} | {result['num_experts']} | {result['r']} | "
            f"{result['expert_rank']} | {'shared' if result['shared'] else 'per expert'} | {result['lora_rank']} | "
            f"{forward['mode']:.2f} | {forward['loop']:.2f} | {train['mode']:.2f} | {train['loop']:.2f} | "
            f"{train['loop'] / train['mode']:.1f}x | {memory['mode'] / memory['lora']:.2f} |"
        )
    return "\n".join(lines)


def layer_summary(report: dict) -> str:
    results = report["results"]
    worst = max(results, key=lambda r: r["forward_backward"]["ratio_to_lora"]["mode"])
    loop_speedups = [r["forward_backward"]["ratio_to_lora"]["loop"] / r["forward_backward"]["ratio_to_lora"]["mode"]
                     for r in results if r["num_experts"] == 16]
    memory = [r["activation_bytes"]["mode"] / r["activation_bytes"]["lora"] for r in results]
    lines = [
        f"- Configurations: {len(results)}.",
        f"- Largest forward + backward ratio to LoRA: {worst['forward_backward']['ratio_to_lora']['mode']:.2f} "
        f"({worst['in_features']} -> {worst['out_features']}, m={worst['num_experts']}, r={worst['r']}, "
        f"p={worst['expert_rank']}, {'shared' if worst['shared'] else 'per-expert'} down-projection).",
        f"- Median forward + backward ratio to LoRA: "
        f"{sorted(r['forward_backward']['ratio_to_lora']['mode'] for r in results)[len(results) // 2]:.2f}.",
        f"- Activation memory MoDE / LoRA: {min(memory):.2f} to {max(memory):.2f}.",
    ]
    if loop_speedups:
        lines.append(f"- Speed-up over the loop at m = 16: {min(loop_speedups):.1f}x to {max(loop_speedups):.1f}x.")
    return "\n".join(lines)


def e2e_table(report: dict) -> str:
    lines = [
        "| precision / variant | trainable params | tokens/s (median) | ratio to LoRA (median) | peak RSS (MiB, median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, value in report["summary"].items():
        ratio = "" if value["ratio_to_lora_median"] is None else f"{value['ratio_to_lora_median']:.2f}"
        lines.append(
            f"| {key} | {value['trainable_parameters']:,} | {value['tokens_per_second_median']:.0f} | {ratio} | "
            f"{value['peak_rss_mib_median']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", nargs="*", default=[], help="layer_benchmark.py JSON files")
    parser.add_argument("--e2e", nargs="*", default=[], help="e2e_throughput.py JSON files")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    sections = []
    for path in args.layer:
        report = json.loads(Path(path).read_text())
        sections += [f"## {Path(path).name}", "", f"`{report['command']}`", "", layer_summary(report), "",
                     layer_table(report), ""]
    for path in args.e2e:
        report = json.loads(Path(path).read_text())
        sections += [f"## {Path(path).name}", "", f"`{report['command']}`", "", e2e_table(report), ""]
    Path(args.output).write_text("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
