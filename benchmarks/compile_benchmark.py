"""Eager against `torch.compile` (default mode) for the MoDE and LoRA adapter paths, and a whole model.

Layer part: forward + backward of the adapter path at one shape, eager and compiled,
interleaved per repeat. Model part: a training step (forward, backward) of a 4-layer
Llama with MoDE on q, k, v and o, eager and compiled, after the compilation has run.
Outputs of compiled and eager runs are compared as well.

Example:
    python benchmarks/compile_benchmark.py --output docs/benchmarks/compile-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters import LayerShape, adapter_path, build_layers  # noqa: E402

from peft_mode import MoDEConfig  # noqa: E402


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def layer_part(shape: LayerShape, tokens: int, repeats: int) -> dict:
    layers = build_layers(shape, torch.float32)
    x = torch.randn(tokens, shape.in_features, requires_grad=True)
    grad = torch.randn(tokens, shape.out_features)
    result = {}
    for name in ("mode", "lora"):
        eager = adapter_path(name, layers[name])
        compiled = torch.compile(eager)
        started = time.perf_counter()
        compiled(x).backward(grad)
        compile_seconds = time.perf_counter() - started
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)

        def run(path):
            def step():
                x.grad = None
                path(x).backward(grad)
            return step

        eager_times, compiled_times = [], []
        for _ in range(repeats):
            eager_times += timed(run(eager), 1)
            compiled_times += timed(run(compiled), 1)
        result[name] = {
            "eager_seconds": statistics.median(eager_times),
            "compiled_seconds": statistics.median(compiled_times),
            "speedup": statistics.median(e / c for e, c in zip(eager_times, compiled_times)),
            "first_call_seconds": compile_seconds,
        }
    return result


def model_part(repeats: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    model = get_peft_model(LlamaForCausalLM(config), MoDEConfig(r=8, num_experts=4, target_modules=["q_proj", "k_proj",
                                                                                                   "v_proj", "o_proj"]))
    model.train()
    input_ids = torch.randint(0, 4096, (8, 256))
    compiled = torch.compile(model)

    def step(runner):
        def run():
            model.zero_grad(set_to_none=True)
            runner(input_ids=input_ids, labels=input_ids).loss.backward()
        return run

    started = time.perf_counter()
    step(compiled)()
    compile_seconds = time.perf_counter() - started
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times += timed(step(model), 1)
        compiled_times += timed(step(compiled), 1)
    with torch.no_grad():
        difference = (compiled(input_ids=input_ids).logits - model(input_ids=input_ids).logits).abs().max().item()
    return {
        "eager_seconds": statistics.median(eager_times),
        "compiled_seconds": statistics.median(compiled_times),
        "speedup": statistics.median(e / c for e, c in zip(eager_times, compiled_times)),
        "first_call_seconds": compile_seconds,
        "max_logit_difference": difference,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    report = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layer_576_576_m8_r8_p1": layer_part(LayerShape(576, 576, 8, 8, 1, True), args.tokens, args.repeats),
        "layer_4096_4096_m8_r8_p1": layer_part(LayerShape(4096, 4096, 8, 8, 1, True), args.tokens, args.repeats),
        "llama_4_layers_train_step": model_part(args.repeats),
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
