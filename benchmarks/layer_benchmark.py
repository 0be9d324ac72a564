"""Time MoDE's adapter path against iso-parametric LoRA and a loop-over-experts implementation.

For every shape and MoDE setting, all three implementations run in the same process. Each
repeat times MoDE, LoRA and the loop back to back (the order rotates between repeats), and
the reported figure is the median over repeats of the per-repeat ratio to LoRA, which
cancels most of the machine's drift. Timed paths compute the update from the input with
the base layer's product excluded; ``--whole-layer`` also times the complete layers.

Activation memory is the size of the tensors autograd saves for backward (measured with
`torch.autograd.graph.saved_tensors_hooks`), excluding the input, which the base layer
saves anyway, and the parameters, which exist regardless.

Examples:
    python benchmarks/layer_benchmark.py --shapes smollm --output docs/benchmarks/layer-smollm.json
    python benchmarks/layer_benchmark.py --shapes 7b --m 8 --r 8 --p 1 --shared-only
    python benchmarks/layer_benchmark.py --device cuda --dtype bfloat16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters import LayerShape, adapter_path, build_layers, whole_layer  # noqa: E402

SHAPES = {
    "smollm": [(576, 576), (576, 1536)],
    "7b": [(4096, 4096), (4096, 11008)],
}
IMPLEMENTATIONS = ("mode", "lora", "loop", "lora_plain")


def time_call(function: Callable[[], None], device: str) -> float:
    """Seconds one call takes: CUDA events on a GPU, the wall clock on a CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def forward_only(path, x):
    def run():
        with torch.no_grad():
            path(x)

    return run


def forward_backward(path, x, grad_output):
    def run():
        x.grad = None
        path(x).backward(grad_output)

    return run


def saved_activation_bytes(path, x, layer) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass, input and parameters excluded."""
    seen: dict[int, int] = {}
    excluded = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = path(x)
    del output
    return sum(seen.values())


def benchmark_shape(shape: LayerShape, tokens: int, dtype: torch.dtype, device: str, repeats: int, warmup: int,
                    whole: bool, implementations=("mode", "lora", "loop")) -> dict:
    layers = {name: layer for name, layer in build_layers(shape, dtype, device).items() if name in implementations}
    for layer in layers.values():
        layer.requires_grad_(True)
        layer.base_layer.requires_grad_(False)
    x = torch.randn(tokens, shape.in_features, dtype=dtype, device=device, requires_grad=True)
    grad_output = torch.randn(tokens, shape.out_features, dtype=dtype, device=device)

    modes = {"forward": {}, "forward_backward": {}}
    for name, layer in layers.items():
        path = adapter_path(name, layer)
        modes["forward"][name] = forward_only(path, x)
        modes["forward_backward"][name] = forward_backward(path, x, grad_output)
        if whole and name != "lora_plain":
            modes.setdefault("layer_forward_backward", {})[name] = forward_backward(whole_layer(name, layer), x, grad_output)

    result = {
        "in_features": shape.in_features, "out_features": shape.out_features, "r": shape.r,
        "num_experts": shape.num_experts, "expert_rank": shape.expert_rank, "shared": shape.shared,
        "mode_parameters": shape.mode_parameters, "lora_rank": shape.lora_rank,
        "lora_parameters": shape.lora_rank * (shape.in_features + shape.out_features),
    }
    for mode, calls in modes.items():
        for _ in range(warmup):
            for call in calls.values():
                call()
        times = {name: [] for name in calls}
        for repeat in range(repeats):
            order = list(calls)
            order = order[repeat % len(order):] + order[: repeat % len(order)]
            for name in order:
                times[name].append(time_call(calls[name], device))
        result[mode] = {
            "median_seconds": {name: statistics.median(values) for name, values in times.items()},
            "ratio_to_lora": {
                name: statistics.median(t / l for t, l in zip(values, times["lora"])) for name, values in times.items()
            },
        }
    result["activation_bytes"] = {
        name: saved_activation_bytes(adapter_path(name, layer), x, layer) for name, layer in layers.items()
    }
    return result


def shapes_to_run(args) -> list[LayerShape]:
    shapes = []
    for shape_group in args.shapes:
        for (in_features, out_features), m, r, p_choice, shared in itertools.product(
            SHAPES[shape_group], args.m, args.r, args.p, args.sharing
        ):
            p = r if p_choice == "r" else int(p_choice)
            if r % p != 0 or p > r:
                continue
            shape = LayerShape(in_features, out_features, r, m, p, shared)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm", "7b"])
    parser.add_argument("--m", nargs="+", type=int, default=[4, 8, 16], help="numbers of experts")
    parser.add_argument("--r", nargs="+", type=int, default=[4, 8, 16], help="ranks")
    parser.add_argument("--p", nargs="+", default=["1", "2", "r"], help="expert ranks; 'r' means p = r")
    parser.add_argument("--sharing", nargs="+", default=["shared", "unshared"], choices=["shared", "unshared"])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (rows of the input)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--whole-layer", action="store_true", help="also time the complete layers")
    parser.add_argument("--implementations", nargs="+", default=["mode", "lora", "loop"], choices=IMPLEMENTATIONS,
                        help="implementations to time; lora is always included as the reference")
    parser.add_argument("--output", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    args.sharing = [choice == "shared" for choice in args.sharing]
    dtype = getattr(torch, args.dtype)

    shapes = shapes_to_run(args)
    started = time.perf_counter()
    results = []
    for shape in tqdm(shapes, desc="Benchmarking"):
        implementations = tuple(dict.fromkeys(["lora", *args.implementations]))
        results.append(
            benchmark_shape(shape, args.tokens, dtype, args.device, args.repeats, args.warmup, args.whole_layer,
                            implementations)
        )
    report = {
        "command": " ".join(sys.argv),
        "seconds": time.perf_counter() - started,
        "tokens": args.tokens,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"Wrote {len(results)} configurations to {args.output} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
