"""Two DDP processes (gloo, CPU) train the same adapter weights as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures import TASKS, save_tiny_causal_lm, write_sni_fixture

CONFIG = {
    "data": {"tasks": list(TASKS), "max_source_length": 64, "max_target_length": 8},
    "adapter": {"method": "mode", "r": 4, "num_experts": 3, "expert_rank": 2, "target_modules": ["q_proj", "v_proj"],
                "router_init_scale": 0.3},
    "training": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 0.01,
                 "group_by_length": False, "warmup_steps": 0, "bf16": False},
    "evaluation": {"enabled": False},
    "router_stats": {"max_batches_per_task": 1},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command, log_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    log_path.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    model_dir = save_tiny_causal_lm(tmp_path / "model")
    sni_dir = write_sni_fixture(tmp_path / "sni")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    train = ["train", "--config", str(config), "--sni-dir", str(sni_dir), "--model", str(model_dir)]
    accelerate = Path(sys.executable).parent / "accelerate"

    run([sys.executable, "-m", "peft_mode.cli", *train, "--output-dir", str(tmp_path / "one")], tmp_path / "one.log")
    run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "peft_mode.cli", *train, "--output-dir", str(tmp_path / "two"),
         "--set", "training.per_device_train_batch_size=2"],
        tmp_path / "two.log",
    )

    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(key.endswith("mode_B") and one[key].abs().sum() > 0 for key in one), "training did not move B"
    losses_one = [r["loss"] for r in map(json.loads, (tmp_path / "one" / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    losses_two = [r["loss"] for r in map(json.loads, (tmp_path / "two" / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
