"""Uploading to and loading from the Hugging Face Hub, without network access.

`push_to_hub` runs unchanged down to `huggingface_hub.HfApi`, whose repository and commit
calls are replaced by recorders. Loading by repo id reads a Hugging Face cache laid out on
disk, with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import get_peft_model
from safetensors.torch import load

from conftest import make_tiny_llama
from peft_mode import MoDEConfig

REPO_ID = "someone/tiny-llama-mode"


@pytest.fixture
def recorded_uploads(monkeypatch):
    """Replace the Hub calls under push_to_hub with recorders; return the files each commit sent."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            with open(source, "rb") as handle:
                files[operation.path_in_repo] = handle.read()
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(oid="0" * 40, commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def missing_card(*args, **kwargs):
        raise EntryNotFoundError("README.md is not in this new repository")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", missing_card)
    return commits


def mode_model(**overrides):
    settings = dict(r=8, num_experts=4, expert_rank=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    settings.update(overrides)
    return get_peft_model(make_tiny_llama(), MoDEConfig(**settings, init_weights=False))


def test_push_to_hub_sends_adapter_and_mode_card(recorded_uploads):
    model = mode_model()

    model.push_to_hub(REPO_ID, commit_message="Add MoDE adapter")

    assert len(recorded_uploads) == 1
    commit = recorded_uploads[0]
    assert commit["repo_id"] == REPO_ID
    assert commit["commit_message"] == "Add MoDE adapter"
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    config = json.loads(commit["files"]["adapter_config.json"])
    assert config["peft_type"] == "MODE"
    assert (config["r"], config["num_experts"], config["expert_rank"]) == (8, 4, 2)

    tensors = load(commit["files"]["adapter_model.safetensors"])
    state = {name: p for name, p in model.named_parameters() if ".mode_" in name}
    assert len(tensors) == len(state)
    for name, value in tensors.items():
        model_name = name.replace(".weight", ".default.weight") if name.endswith(".weight") else name + ".default"
        assert torch.equal(value, state[model_name]), name

    card = ModelCard(commit["files"]["README.md"].decode())
    assert "pip install peft-mode" in card.text
    assert "import peft_mode" in card.text
    assert f'PeftModel.from_pretrained(base_model, "{REPO_ID}")' in card.text
    assert "| default | 8 | 4 | 2 | 4 | True | r (unscaled) | 0 | soft, all experts | q_proj, v_proj |" in card.text
    assert {"peft-mode", "mode"} <= set(card.data.tags)
    assert card.data.library_name == "peft"


def test_push_twice_keeps_one_mode_section(recorded_uploads):
    model = mode_model()

    model.push_to_hub(REPO_ID)
    model.push_to_hub(REPO_ID)

    text = recorded_uploads[-1]["files"]["README.md"].decode()
    assert text.count("## MoDE adapter") == 1


def test_push_two_adapters_sends_subfolder(recorded_uploads):
    model = mode_model()
    model.add_adapter("second", MoDEConfig(r=4, num_experts=2, target_modules=["q_proj"]))

    model.push_to_hub(REPO_ID)

    files = recorded_uploads[0]["files"]
    assert "second/adapter_config.json" in files
    assert "second/adapter_model.safetensors" in files
    text = files["README.md"].decode()
    assert "| second | 4 | 2 | 1 |" in text
    assert "subfolder=NAME" in text


def test_save_pretrained_writes_mode_card(tmp_path):
    mode_model().save_pretrained(tmp_path)

    text = (tmp_path / "README.md").read_text()

    assert "## MoDE adapter" in text
    assert "import peft_mode" in text
    assert "- PEFT" in text  # peft's own framework-version line is kept


def write_hub_cache(cache_root, repo_id, files_dir, commit="1" * 40):
    """Lay out ``files_dir`` as the snapshot of ``repo_id`` in a Hugging Face hub cache."""
    repo_folder = cache_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(files_dir, snapshot)
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)


def test_load_repo_id_from_offline_cache(tmp_path):
    base_dir = tmp_path / "base"
    base = make_tiny_llama()
    base.config._name_or_path = "someone/tiny-llama"
    base.save_pretrained(base_dir)
    adapter_dir = tmp_path / "adapter"
    model = mode_model()
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/tiny-llama"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    hub_cache = tmp_path / "hf_home" / "hub"
    write_hub_cache(hub_cache, "someone/tiny-llama", base_dir)
    write_hub_cache(hub_cache, REPO_ID, adapter_dir)
    tokens = torch.arange(3, 13).view(1, 10)
    expected = model.eval()(tokens).logits
    torch.save({"tokens": tokens, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import peft_mode
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM

        saved = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained("someone/tiny-llama")
        by_peft_model = PeftModel.from_pretrained(base, {REPO_ID!r}).eval()
        by_auto_class = AutoPeftModelForCausalLM.from_pretrained({REPO_ID!r}).eval()
        assert torch.equal(by_peft_model(saved["tokens"]).logits, saved["expected"])
        assert torch.equal(by_auto_class(saved["tokens"]).logits, saved["expected"])
        print("loaded from cache")
        """
    )
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    environment.pop("HF_HUB_CACHE", None)

    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded from cache" in result.stdout
