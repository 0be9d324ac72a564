"""Profile the adapter path of MoDE, LoRA and the loop-over-experts implementation at one shape.

Runs forward + backward under `torch.profiler` and prints, per implementation, the total
time and the operators that take most of it. Use it to see where a ratio in the layer
benchmark comes from:

    python benchmarks/profile_layer.py --in-features 576 --out-features 576 --m 16 --r 16 --p 1 \
        --output docs/benchmarks/profile-576-m16-r16-p1.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import LayerShape, adapter_path, build_layers  # noqa: E402

logger = logging.getLogger("profile_layer")


def profile_implementation(path, x, grad_output, steps: int, top: int) -> dict:
    """Profile `steps` forward + backward calls of `path` and summarise the operators."""
    for _ in range(2):
        x.grad = None
        path(x).backward(grad_output)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            x.grad = None
            path(x).backward(grad_output)
    events = prof.key_averages()
    # Self time of every operator adds up to the profiled total without double counting.
    total_us = sum(event.self_cpu_time_total for event in events)
    rows = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return {
        "total_ms_per_step": total_us / steps / 1000.0,
        "operators": [
            {
                "name": event.key,
                "calls_per_step": event.count / steps,
                "self_ms_per_step": event.self_cpu_time_total / steps / 1000.0,
                "share": event.self_cpu_time_total / total_us if total_us else 0.0,
            }
            for event in rows
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=576)
    parser.add_argument("--m", type=int, default=16, help="number of experts")
    parser.add_argument("--r", type=int, default=16, help="rank of the down-projection")
    parser.add_argument("--p", type=int, default=1, help="expert rank")
    parser.add_argument("--per-expert", action="store_true", help="one down-projection per expert")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="profiled forward + backward calls")
    parser.add_argument("--top", type=int, default=8, help="operators to list per implementation")
    parser.add_argument("--implementations", nargs="+", default=["mode", "lora", "loop"])
    parser.add_argument("--output", type=Path, help="write the summary as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    shape = LayerShape(args.in_features, args.out_features, args.r, args.m, args.p, not args.per_expert)
    layers = build_layers(shape, torch.float32)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, shape.in_features, requires_grad=True)
    grad_output = torch.randn(args.tokens, shape.out_features)

    results = {}
    for name in args.implementations:
        summary = profile_implementation(adapter_path(name, layers[name]), x, grad_output, args.steps, args.top)
        results[name] = summary
        print(f"\n{name}: {summary['total_ms_per_step']:.2f} ms per forward + backward")
        print(f"  {'operator':<32} {'calls':>6} {'ms':>8} {'share':>7}")
        for row in summary["operators"]:
            print(f"  {row['name']:<32} {row['calls_per_step']:>6.0f} {row['self_ms_per_step']:>8.2f} {row['share']:>7.1%}")

    if args.output:
        record = {
            "command": "python benchmarks/profile_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "shape": shape.__dict__,
            "lora_rank": shape.lora_rank,
            "tokens": args.tokens,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "results": results,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
        logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
