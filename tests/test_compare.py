"""The comparison grid: budget checks, resumption, refusal to mix configs, and the report."""

from __future__ import annotations

import json

import pytest
import yaml

from fixtures import TASKS, save_tiny_causal_lm, write_sni_fixture
from peft_mode.cli import main
from peft_mode.compare.cli import parse_reference
from peft_mode.compare.grid import check_budgets, load_comparison_config, run_grid
from peft_mode.compare.report import build_report, collect_results, pairwise, paper_order_statement, write_report
from peft_mode.experiment import ConfigError
from peft_mode.training.run import run_experiment

GRID = {
    "data": {"tasks": list(TASKS), "max_source_length": 64, "max_target_length": 8},
    "adapter": {"target_modules": ["q_proj", "v_proj"]},
    "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "bf16": False},
    "evaluation": {"max_new_tokens": 3, "batch_size": 4, "bf16": False},
    "router_stats": {"max_batches_per_task": 1},
    "comparison": {
        "seeds": [0, 1],
        "budget_tolerance": 0.05,
        "adapters": [
            {"name": "lora", "method": "lora", "r": 8},
            {"name": "mode", "method": "mode", "r": 4, "num_experts": 2, "expert_rank": 2},
        ],
    },
}


@pytest.fixture
def grid_files(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(GRID))
    return {
        "config": config,
        "model": save_tiny_causal_lm(tmp_path / "model"),
        "sni": write_sni_fixture(tmp_path / "sni"),
        "output": tmp_path / "grid",
    }


def make_runner(files, interrupt_on_call=None):
    calls = []

    def run_one(config, directory):
        calls.append((config.adapter.method, config.training.seed))
        if interrupt_on_call is not None and len(calls) == interrupt_on_call:
            directory.mkdir(parents=True)
            (directory / "partial-checkpoint").write_text("interrupted here")
            raise KeyboardInterrupt
        config.model = str(files["model"])
        config.data.sni_dir = str(files["sni"])
        return run_experiment(config, directory)

    return run_one, calls


def test_interrupted_grid_resumes_where_it_stopped(grid_files):
    comparison = load_comparison_config(grid_files["config"])
    first_runner, first_calls = make_runner(grid_files, interrupt_on_call=3)

    with pytest.raises(KeyboardInterrupt):
        run_grid(comparison, grid_files["output"], first_runner)
    completed_before = (grid_files["output"] / "runs" / "lora" / "seed-0" / "run.json").stat().st_mtime
    second_runner, second_calls = make_runner(grid_files)
    status = run_grid(comparison, grid_files["output"], second_runner)

    assert first_calls == [("lora", 0), ("mode", 0), ("lora", 1)]
    assert second_calls == [("lora", 1), ("mode", 1)]
    assert status.skipped == [("lora", 0), ("mode", 0)]
    assert (grid_files["output"] / "runs" / "lora" / "seed-0" / "run.json").stat().st_mtime == completed_before
    assert not (grid_files["output"] / "runs" / "lora" / "seed-1" / "partial-checkpoint").exists()
    results = collect_results(grid_files["output"])
    assert [(r.name, sorted(r.overall_by_seed)) for r in results] == [("lora", [0, 1]), ("mode", [0, 1])]


def test_changed_settings_are_refused(grid_files):
    run_grid(load_comparison_config(grid_files["config"]), grid_files["output"], make_runner(grid_files)[0])

    changed_experiment = load_comparison_config(grid_files["config"], ["training.max_steps=3"])
    changed_adapter = yaml.safe_load(grid_files["config"].read_text())
    changed_adapter["comparison"]["adapters"][1]["num_experts"] = 3
    grid_files["config"].write_text(yaml.safe_dump(changed_adapter))

    with pytest.raises(ConfigError, match="different settings"):
        run_grid(changed_experiment, grid_files["output"], make_runner(grid_files)[0])
    with pytest.raises(ConfigError, match="Adapter 'mode'.*Give the changed adapter a new name"):
        run_grid(load_comparison_config(grid_files["config"]), grid_files["output"], make_runner(grid_files)[0])


def test_compare_command_runs_grid_and_writes_report(grid_files, tmp_path):
    code = main(["compare", "--config", str(grid_files["config"]), "--sni-dir", str(grid_files["sni"]),
                 "--model", str(grid_files["model"]), "--output-dir", str(grid_files["output"]),
                 "--report-dir", str(tmp_path / "report")])

    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert code == 0
    assert [method["name"] for method in data["methods"]] == ["lora", "mode"]
    assert (tmp_path / "report" / "figures" / "results-per-task.png").exists()
    assert (tmp_path / "report" / "figures" / "results-router-heatmap.png").exists()
    assert "## Per-task win rates" in (tmp_path / "report" / "results.md").read_text()


def test_budget_mismatch_is_reported(grid_files, capsys):
    values = yaml.safe_load(grid_files["config"].read_text())
    values["comparison"]["adapters"][1]["num_experts"] = 8
    grid_files["config"].write_text(yaml.safe_dump(values))

    code = main(["compare", "--config", str(grid_files["config"]), "--sni-dir", str(grid_files["sni"]),
                 "--model", str(grid_files["model"]), "--output-dir", str(grid_files["output"])])

    assert code == 2
    assert "outside the 5% budget of lora" in capsys.readouterr().err


def test_check_budgets_names_each_outlier():
    check_budgets({"a": 1000, "b": 1040}, 0.05)

    with pytest.raises(ConfigError, match=r"c: 1,100 \(\+10.0%\)"):
        check_budgets({"a": 1000, "b": 1040, "c": 1100}, 0.05)


@pytest.mark.parametrize(
    "text, expected",
    [("lora:32", ("lora", 32, 1, 32)), ("molora:7x4", ("molora", 4, 7, 4)), ("mode:5x8x2", ("mode", 8, 5, 2))],
)
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["lora", "mode:5x8", "gora:3", "molora:axb"])
def test_parse_reference_errors(text):
    with pytest.raises(ConfigError, match="--like"):
        parse_reference(text)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": []}, "non-empty list"),
        ({"adapters": [{"name": "x", "method": "lora", "r": 4}]}, "at least two adapters"),
        ({"adapters": [{"name": "x", "method": "lora", "r": 4}, {"name": "x", "method": "lora", "r": 8}]}, "unique"),
        ({"adapters": [{"name": "x", "method": "dora", "r": 4}, {"name": "y", "method": "lora", "r": 8}]}, "method"),
        ({"adapters": [{"name": "x", "method": "lora"}, {"name": "y", "method": "lora", "r": 8}]}, "needs 'r'"),
        ({"adapters": [{"name": "a/b", "method": "lora", "r": 4}, {"name": "y", "method": "lora", "r": 8}]}, "plain folder"),
        ({"shuffle": True}, "Unknown key"),
    ],
)
def test_comparison_config_errors(tmp_path, change, message):
    values = yaml.safe_load(yaml.safe_dump(GRID))
    values["comparison"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))

    with pytest.raises(ConfigError, match=message):
        load_comparison_config(path)


def write_fake_grid(root, scores):
    """scores: {adapter name: (method, settings, {seed: {task: score}})}."""
    manifest = {"fingerprint": "fake", "adapters": {}, "seeds": [0, 1]}
    for name, (method, settings, by_seed) in scores.items():
        manifest["adapters"][name] = {"method": method, **settings}
        for seed, per_task in by_seed.items():
            run_dir = root / "runs" / name / f"seed-{seed}"
            run_dir.mkdir(parents=True)
            overall = sum(per_task.values()) / len(per_task)
            (run_dir / "eval.json").write_text(json.dumps({"overall": overall, "per_task": per_task}))
            (run_dir / "run.json").write_text(json.dumps({"train_seconds": 60.0 * (seed + 1), "eval_seconds": 30.0,
                                                           "trainable_parameters": 1000, "total_parameters": 101000}))
    (root / "comparison.json").write_text(json.dumps(manifest))


FAKE = {
    "lora": ("lora", {"r": 8}, {0: {"t1": 10.0, "t2": 20.0, "t3": 30.0}, 1: {"t1": 12.0, "t2": 22.0, "t3": 32.0}}),
    "mode": ("mode", {"r": 4, "num_experts": 4, "expert_rank": 1},
             {0: {"t1": 20.0, "t2": 30.0, "t3": 40.0}, 1: {"t1": 22.0, "t2": 31.0, "t3": 35.0}}),
}


def test_report_on_fake_results(tmp_path):
    write_fake_grid(tmp_path / "grid", FAKE)

    results = collect_results(tmp_path / "grid")
    markdown, data = build_report(results, "Fake", "peft-mode compare ...", "test machine")
    lora, mode = results

    assert lora.mean == pytest.approx((20.0 + 22.0) / 2)
    assert mode.mean == pytest.approx((30.0 + (22 + 31 + 35) / 3) / 2)
    assert lora.std == pytest.approx(1.4142135, rel=1e-6)
    assert lora.task_means() == {"t1": 11.0, "t2": 21.0, "t3": 31.0}
    pair = pairwise(mode, lora)
    assert (pair.wins, pair.losses, pair.ties, pair.win_rate) == (3, 0, 0, 1.0)
    assert pair.sign_test_p == pytest.approx(0.25)  # 2 * 0.5 ** 3
    assert pair.wilcoxon_p == pytest.approx(0.25)  # exact test, 3 positive differences
    assert "| LoRA r=8 | 1,000 | 1.00% | 21.00 | 1.41 | 20.00, 22.00 | 1.5 min | 0.5 min |" in markdown
    # task means: LoRA 11, 21, 31 and MoDE 21, 30.5, 37.5, so A - B = -(10 + 9.5 + 6.5) / 3
    assert "| LoRA r=8 | MoDE 4x4x1 | 0 | 3 | 0 | 0% | -8.67 | 0.250 | 0.250 |" in markdown
    statement = paper_order_statement(results)
    assert statement[2] == "The order is the same as in the paper."
    assert "larger than the seed spread" in statement[3]
    assert data["methods"][1]["task_means"]["t3"] == pytest.approx(37.5)


def test_report_states_overlapping_spread_and_other_order(tmp_path):
    fake = {
        "lora": ("lora", {"r": 8}, {0: {"t1": 30.0}, 1: {"t1": 20.0}}),
        "mode": ("mode", {"r": 4, "num_experts": 4, "expert_rank": 1}, {0: {"t1": 24.0}, 1: {"t1": 22.0}}),
    }
    write_fake_grid(tmp_path / "grid", fake)

    statement = paper_order_statement(collect_results(tmp_path / "grid"))

    assert statement[2] == "The order differs from the paper's."
    assert "within the seed spread" in statement[3]


def test_write_report_files(tmp_path):
    write_fake_grid(tmp_path / "grid", FAKE)

    written = write_report(tmp_path / "grid", tmp_path / "docs", command="peft-mode compare --config x",
                           notes="Setup: three fake tasks.")

    text = written["markdown"].read_text()
    assert text.startswith("# LoRA, MoLoRA, MoLoRA-SD and MoDE at matched parameter budgets\n\nSetup: three fake tasks.\n")
    assert "Command: `peft-mode compare --config x`" in text
    assert json.loads(written["json"].read_text())["command"] == "peft-mode compare --config x"
    assert written["per_task_plot"].stat().st_size > 1000


def test_compare_report_command(tmp_path, capsys):
    write_fake_grid(tmp_path / "grid", FAKE)
    notes = tmp_path / "notes.md"
    notes.write_text("Caveat: fake numbers.")

    missing = main(["compare-report", "--output-dir", str(tmp_path / "grid"), "--notes", str(tmp_path / "none.md")])
    written = main(["compare-report", "--output-dir", str(tmp_path / "grid"), "--report-dir", str(tmp_path / "docs"),
                    "--notes", str(notes)])

    assert missing == 2
    assert f"Notes file {tmp_path / 'none.md'} does not exist" in capsys.readouterr().err
    assert written == 0
    assert "Caveat: fake numbers." in (tmp_path / "docs" / "results.md").read_text()


def test_extra_keys_reach_runs_and_counts(tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_mode.compare.grid import adapter_parameter_counts
    from peft_mode.training.run import adapter_config

    values = yaml.safe_load(yaml.safe_dump(GRID))
    values["comparison"]["adapters"].append(
        {"name": "mode-per-expert", "method": "mode", "r": 4, "num_experts": 3, "expert_rank": 1, "top_k": 2,
         "share_down_projection": False}
    )
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(values))
    comparison = load_comparison_config(path)
    adapter = comparison.adapters[-1]
    settings = comparison.run_config(adapter, 0).adapter

    assert settings.top_k == 2
    assert settings.share_down_projection is False
    assert adapter.label() == "MoDE 3x4x1 (per-expert A)"

    model_dir = save_tiny_causal_lm(tmp_path / "model")
    counts = adapter_parameter_counts(comparison, AutoModelForCausalLM.from_pretrained(model_dir))
    for entry in comparison.adapters:
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir), adapter_config(comparison.run_config(entry, 0).adapter)
        )
        assert counts[entry.name] == peft_model.get_nb_trainable_parameters()[0], entry.name


def test_share_key_only_for_mode_entries(tmp_path):
    values = yaml.safe_load(yaml.safe_dump(GRID))
    values["comparison"]["adapters"][0]["share_down_projection"] = False
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(values))

    expected = r"adapters\[0\] \(lora\): adapter\.share_down_projection=False applies to method mode only"
    with pytest.raises(ConfigError, match=expected):
        load_comparison_config(path)
