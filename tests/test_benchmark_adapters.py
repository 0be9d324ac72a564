"""The benchmark's three implementations compute the same update, so their timings compare like with like."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from adapters import LayerShape, adapter_path, build_layers  # noqa: E402


@pytest.mark.parametrize(
    "shape",
    [LayerShape(12, 10, 4, 3, 1, True), LayerShape(12, 10, 4, 3, 4, True), LayerShape(12, 10, 4, 3, 2, False),
     LayerShape(12, 10, 8, 2, 8, False)],
)
def test_loop_implementation_equals_mode(shape):
    layers = build_layers(shape, torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64)

    torch.testing.assert_close(adapter_path("loop", layers["loop"])(x), adapter_path("mode", layers["mode"])(x))


def test_lora_rank_is_iso_parametric():
    shape = LayerShape(4096, 4096, 8, 8, 1, True)

    # MoDE: 8*4096 + 8*8*4096 + 8*8*4096 = 136 * 4096 parameters; LoRA r has r * 8192.
    assert shape.mode_parameters == 136 * 4096
    assert shape.lora_rank == 68
    assert build_layers(shape, torch.float32)["lora"].lora_A["default"].weight.shape == (68, 4096)


def test_profile_script_writes_operator_summary(tmp_path):
    from profile_layer import main

    output = tmp_path / "profile.json"
    main(["--in-features", "16", "--out-features", "12", "--m", "3", "--r", "4", "--p", "2", "--tokens", "32",
          "--steps", "2", "--output", str(output)])

    record = json.loads(output.read_text())
    assert set(record["results"]) == {"mode", "lora", "loop"}
    for summary in record["results"].values():
        assert summary["total_ms_per_step"] > 0
        assert summary["operators"]
        assert all(0.0 <= row["share"] <= 1.0 for row in summary["operators"])
