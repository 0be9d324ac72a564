"""Importing peft_mode registers MODE with peft once, and the supported peft range is declared."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import peft
import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_mode
from peft_mode import MoDEConfig, MoDEModel
from peft_mode.tuner import registration

ROOT = Path(__file__).resolve().parents[1]


def test_mode_is_a_peft_type():
    assert PeftType.MODE == "MODE"
    assert PeftType("MODE") is PeftType.MODE
    assert PeftType["MODE"] is PeftType.MODE
    assert "MODE" in list(PeftType)
    assert list(PeftType).count(PeftType.MODE) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MODE] is MoDEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MODE"] is MoDEModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MODE] == "mode_"


def test_second_import_and_register_are_harmless():
    members_before = list(PeftType)
    card_writer = peft.PeftModel.create_or_update_model_card

    importlib.reload(importlib.import_module("peft_mode.tuner.peft_type"))
    registration.register()
    registration.register()

    assert list(PeftType) == members_before
    assert peft.PeftModel.create_or_update_model_card is card_writer
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MODE] is MoDEConfig


def test_conflicting_registration_raises(monkeypatch):
    class OtherConfig(MoDEConfig):
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.MODE, OtherConfig)

    with pytest.raises(RuntimeError, match="already maps the MODE adapter type"):
        registration.register()


def test_fresh_interpreter_can_import_twice():
    code = "import peft_mode, importlib; import peft_mode; from peft import PeftType; print(PeftType.MODE.value)"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "MODE"


def test_loading_without_import_fails_and_with_import_works(tmp_path):
    MoDEConfig(r=4, num_experts=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    without = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    with_import = f"import peft_mode; from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)"

    failed = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True)
    loaded = subprocess.run([sys.executable, "-c", with_import], capture_output=True, text=True, check=True)

    assert failed.returncode != 0
    assert "MODE" in failed.stderr
    assert loaded.stdout.strip() == "MoDEConfig"


def test_declared_peft_range_matches_check_and_installed_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = {Requirement(line).name: Requirement(line) for line in project["project"]["dependencies"]}

    assert requirements["peft"].specifier == registration.SUPPORTED_PEFT_VERSIONS
    assert Version(peft.__version__) in registration.SUPPORTED_PEFT_VERSIONS
    assert registration.check_peft_version(peft.__version__)


@pytest.mark.parametrize("version", ["0.20.0", "0.22.0", "1.0.0"])
def test_unsupported_peft_version_warns(version):
    with pytest.warns(UserWarning, match=f"peft {version} is installed"):
        assert not registration.check_peft_version(version)


def test_public_names():
    for name in ("MoDEConfig", "MoDEModel", "MoDELayer", "MoDELinear", "MoDEMergeError", "MODE_PEFT_TYPE"):
        assert hasattr(peft_mode, name)
    assert isinstance(PeftConfig.from_peft_type(peft_type="MODE", r=4), MoDEConfig)
