"""The peft-mode command line on a tiny model and SNI files written by the tests."""

from __future__ import annotations

import json

import pytest
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fixtures import TASKS, save_tiny_causal_lm, write_sni_fixture
from peft_mode.cli import main
from peft_mode.experiment import ConfigError

TINY_CONFIG = {
    "data": {"tasks": list(TASKS), "max_source_length": 64, "max_target_length": 8},
    "adapter": {"method": "mode", "r": 4, "num_experts": 3, "expert_rank": 2, "target_modules": ["q_proj", "v_proj"]},
    "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 2, "learning_rate": 0.01},
    "evaluation": {"max_new_tokens": 4, "batch_size": 4},
    "router_stats": {"max_batches_per_task": 1, "detail": "layer"},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_causal_lm(root / "model")
    sni_dir = write_sni_fixture(root / "sni")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY_CONFIG))
    return {"root": root, "model": str(model_dir), "sni": str(sni_dir), "config": str(config_path)}


@pytest.fixture(scope="module")
def trained_run(workspace):
    output_dir = workspace["root"] / "run"
    code = main(["train", "--config", workspace["config"], "--sni-dir", workspace["sni"], "--model", workspace["model"],
                 "--output-dir", str(output_dir)])
    assert code == 0
    return output_dir


def test_train_writes_every_output(trained_run):
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "experiment.yaml", "trainer_log.jsonl",
                 "router_stats.jsonl", "router_usage_by_task.json", "router_heatmap_average.png", "eval.json", "eval.md",
                 "run.json"):
        assert (trained_run / name).exists(), name
    assert not (trained_run / "trainer").exists()
    results = json.loads((trained_run / "eval.json").read_text())
    assert set(results["per_task"]) == set(TASKS)
    assert results["counts"] == {task: 1 for task in TASKS}
    logs = [json.loads(line) for line in (trained_run / "trainer_log.jsonl").read_text().splitlines()]
    assert any("router/layers.0.self_attn.q_proj/entropy" in record for record in logs)
    run = json.loads((trained_run / "run.json").read_text())
    assert run["steps"] == 4 and run["trainable_parameters"] > 0
    used = yaml.safe_load((trained_run / "experiment.yaml").read_text())
    assert used["adapter"]["expert_rank"] == 2 and used["data"]["sni_dir"]


def test_trained_adapter_loads_with_peft(trained_run, workspace):
    import peft_mode  # noqa: F401

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace["model"]), trained_run)

    state = load_file(trained_run / "adapter_model.safetensors")
    assert any(key.endswith("mode_router.weight") for key in state)
    assert model.peft_config["default"].num_experts == 3


def test_evaluate_command_reproduces_train_eval(trained_run, workspace, capsys):
    code = main(["evaluate", "--adapter", str(trained_run), "--model", workspace["model"], "--name", "again"])

    printed = capsys.readouterr().out
    assert code == 0
    first = json.loads((trained_run / "eval.json").read_text())
    again = json.loads((trained_run / "again.json").read_text())
    assert again["overall"] == pytest.approx(first["overall"])
    assert "| **overall (mean over instances)** |" in printed


def test_evaluate_untuned_with_baseline(trained_run, workspace):
    output_dir = workspace["root"] / "untuned"
    code = main(["evaluate", "--untuned", "--config", workspace["config"], "--sni-dir", workspace["sni"],
                 "--model", workspace["model"], "--output-dir", str(output_dir),
                 "--baseline", str(trained_run / "eval.json")])

    assert code == 0
    assert "| task | eval instances | baseline ROUGE-L | this run ROUGE-L | change |" in (output_dir / "eval.md").read_text()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sni-dir", "{root}/nowhere"], "SNI folder {root}/nowhere does not exist"),
        (["--set", "data.tasks=[task999]"], "Unknown task 'task999'"),
        (["--set", "adapter.expert_rank=3"], "adapter.expert_rank=3 must divide adapter.r=4"),
        (["--set", "training.learnig_rate=0.1"], "Unknown key(s) ['learnig_rate'] in section 'training'"),
        (["--set", "optimizer.lr=0.1"], "must name a section and a key"),
        (["--set", "training.max_steps"], "must have the form section.key=value"),
        (["--model", "{root}/no-model"], "Model folder {root}/no-model does not exist"),
        (["--set", "adapter.top_k=4"], "adapter.top_k must be an integer from 1 to adapter.num_experts=3, got 4"),
        (["--set", "adapter.method=lora", "--set", "adapter.top_k=1"], "adapter.top_k=1 applies to routed adapters"),
    ],
)
def test_train_errors_name_the_problem(workspace, capsys, arguments, message):
    arguments = [argument.format(root=workspace["root"]) for argument in arguments]
    base = ["train", "--config", workspace["config"], "--model", workspace["model"], "--sni-dir", workspace["sni"],
            "--output-dir", str(workspace["root"] / "failed")]

    code = main(base + arguments)

    assert code == 2
    assert message.format(root=workspace["root"]) in capsys.readouterr().err
    assert not (workspace["root"] / "failed").exists()


def test_missing_config_file_and_bad_yaml(workspace, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    unknown_section = tmp_path / "unknown.yaml"
    unknown_section.write_text("trainer: {max_steps: 3}\n")

    codes = [
        main(["train", "--config", str(tmp_path / "none.yaml"), "--output-dir", str(tmp_path / "o")]),
        main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "o")]),
        main(["train", "--config", str(unknown_section), "--output-dir", str(tmp_path / "o")]),
        main(["train", "--config", workspace["config"], "--output-dir", str(tmp_path / "o")]),
    ]

    errors = capsys.readouterr().err
    assert codes == [2, 2, 2, 2]
    assert f"Config file {tmp_path / 'none.yaml'} does not exist" in errors
    assert "is not valid YAML" in errors
    assert "Unknown top-level key(s) ['trainer']" in errors
    assert "No SNI folder given: pass --sni-dir PATH" in errors


def test_evaluate_rejects_folder_without_adapter(workspace, capsys, tmp_path):
    code = main(["evaluate", "--adapter", str(tmp_path), "--sni-dir", workspace["sni"]])

    assert code == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_lora_method_trains_through_same_command(workspace, tmp_path):
    code = main(["train", "--config", workspace["config"], "--sni-dir", workspace["sni"], "--model", workspace["model"],
                 "--output-dir", str(tmp_path / "lora"), "--set", "adapter.method=lora", "--no-eval"])

    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert code == 0
    assert saved["peft_type"] == "LORA"
    assert not (tmp_path / "lora" / "router_stats.jsonl").exists()
    assert not (tmp_path / "lora" / "eval.json").exists()


def test_evaluate_on_tasks_not_trained_on(trained_run, workspace, tmp_path):
    sni_dir = write_sni_fixture(tmp_path / "sni", {"task009_unseen": TASKS["task002_uppercase"]})

    code = main(["evaluate", "--adapter", str(trained_run), "--model", workspace["model"], "--sni-dir", str(sni_dir),
                 "--set", "data.tasks=[task009]", "--output-dir", str(tmp_path / "unseen")])

    results = json.loads((tmp_path / "unseen" / "eval.json").read_text())
    assert code == 0
    assert list(results["per_task"]) == ["task009_unseen"]


def test_smollm2_base_note_keeps_card(tmp_path):
    from peft_mode.training.run import add_smollm2_base_note

    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# Card\n\nExisting text.\n")

    add_smollm2_base_note(tmp_path)
    add_smollm2_base_note(tmp_path)

    text = (tmp_path / "README.md").read_text()
    assert text.count("## Base model") == 1
    assert "Existing text." in text
    assert "library_name: peft" in text
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text
    assert "peft-mode fetch-model" in text


def test_top_k_reaches_adapter_config():
    from peft_mode.experiment import AdapterSettings
    from peft_mode.training.run import adapter_config

    config = adapter_config(AdapterSettings(method="mode", r=4, num_experts=3, expert_rank=2, top_k=2))

    assert config.top_k == 2
    assert config.num_experts == 3


@pytest.mark.parametrize(
    "method, share, expected",
    [("mode", None, True), ("mode", False, False), ("mode", True, True), ("molora", None, False),
     ("molora_sd", None, True)],
)
def test_share_key_reaches_adapter_config(method, share, expected):
    from peft_mode.experiment import AdapterSettings
    from peft_mode.training.run import adapter_config

    config = adapter_config(AdapterSettings(method=method, r=4, num_experts=3, share_down_projection=share))

    assert config.share_down_projection is expected


@pytest.mark.parametrize(
    "override, message",
    [("adapter.share_down_projection=yes please", "must be true, false or null"),
     ("adapter.method=molora_sd", "applies to method mode only"),
     ("adapter.method=lora", "applies to method mode only")],
)
def test_share_key_checked(override, message):
    from peft_mode.experiment import load_experiment_config

    with pytest.raises(ConfigError, match=message):
        load_experiment_config(None, ["adapter.share_down_projection=false", override])
