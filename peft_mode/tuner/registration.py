"""Registration of MoDE with PEFT.

Running `register()` (done by ``import peft_mode``) makes "MODE" a PEFT method:

- adds the ``MODE`` member to `peft.utils.PeftType` (see `peft_type`);
- registers `MoDEConfig` and `MoDEModel` with `peft.utils.register_peft_method`, which
  `get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and the
  ``AutoPeftModel`` classes read;
- makes `PeftModel.save_pretrained` and `PeftModel.push_to_hub` write a model card with
  the steps to load a MoDE adapter.

Calling it again does nothing.
"""

from __future__ import annotations

import functools
import logging
import warnings

import peft
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .card import write_mode_card
from .config import MoDEConfig
from .model import MoDEModel
from .peft_type import MODE_PEFT_TYPE

logger = logging.getLogger(__name__)

_PATCH_MARKER = "_peft_mode_wrapped"

# NOTE: keep in step with the peft requirement in pyproject.toml. The tuner subclasses peft's
# BaseTuner and BaseTunerLayer, whose private hooks change between minor releases.
SUPPORTED_PEFT_VERSIONS = SpecifierSet(">=0.21,<0.22")


def check_peft_version(version: str) -> bool:
    """Warn and return False if ``version`` of peft is outside `SUPPORTED_PEFT_VERSIONS`."""
    if Version(version) in SUPPORTED_PEFT_VERSIONS:
        return True
    warnings.warn(
        f"peft-mode supports peft {SUPPORTED_PEFT_VERSIONS}, but peft {version} is installed. MoDE adapters may "
        f"fail to build, save or load. Install a supported release: pip install 'peft{SUPPORTED_PEFT_VERSIONS}'.",
        stacklevel=3,
    )
    return False


def mode_configs_of(peft_model: PeftModel) -> dict[str, MoDEConfig]:
    """Return the MoDE adapter configs of a `PeftModel`, keyed by adapter name."""
    return {name: config for name, config in peft_model.peft_config.items() if isinstance(config, MoDEConfig)}


def _wrap_card_writer(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        mode_configs = mode_configs_of(self)
        if mode_configs:
            write_mode_card(output_dir, mode_configs)

    setattr(create_or_update_model_card, _PATCH_MARKER, True)
    return create_or_update_model_card


def _wrap_upload(original):
    # transformers' push_to_hub replaces the README that save_pretrained wrote with the card it
    # loads from the Hub (a transformers template for a new repository), so peft's card fields
    # and the MoDE section are written again right before the upload.
    @functools.wraps(original)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        mode_configs = mode_configs_of(self) if isinstance(self, PeftModel) else {}
        if mode_configs:
            self.create_or_update_model_card(str(working_dir))
            write_mode_card(str(working_dir), mode_configs, repo_id=repo_id)
        return original(self, working_dir, repo_id, *args, **kwargs)

    setattr(_upload_modified_files, _PATCH_MARKER, True)
    return _upload_modified_files


def register() -> None:
    """Register MoDE with PEFT; safe to call more than once."""
    check_peft_version(peft.__version__)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(MODE_PEFT_TYPE)
    if registered is None:
        register_peft_method(name="mode", config_cls=MoDEConfig, model_cls=MoDEModel, prefix="mode_")
        logger.debug("Registered the MODE adapter type with peft.")
    elif registered is not MoDEConfig or PEFT_TYPE_TO_TUNER_MAPPING.get(MODE_PEFT_TYPE) is not MoDEModel:
        raise RuntimeError(
            f"peft already maps the MODE adapter type to {registered!r}, not to peft_mode's MoDEConfig. Another "
            "package registered a different MODE method, or peft_mode was imported from two locations; import "
            "only one of them."
        )

    if not getattr(PeftModel.create_or_update_model_card, _PATCH_MARKER, False):
        PeftModel.create_or_update_model_card = _wrap_card_writer(PeftModel.create_or_update_model_card)
    if not getattr(PeftModel._upload_modified_files, _PATCH_MARKER, False):
        PeftModel._upload_modified_files = _wrap_upload(PeftModel._upload_modified_files)
