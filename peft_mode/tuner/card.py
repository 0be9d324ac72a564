"""Model-card section for saved and uploaded MoDE adapters."""

from __future__ import annotations

import os
from typing import Optional

from huggingface_hub import ModelCard

from .config import MoDEConfig

CARD_START = "<!-- peft-mode: start -->"
CARD_END = "<!-- peft-mode: end -->"
CARD_TAGS = ("peft-mode", "mode", "mixture-of-experts")


def _settings_table(mode_configs: dict[str, MoDEConfig]) -> list[str]:
    lines = [
        "| adapter | r | experts (m) | expert rank (p) | routing slots (r/p) | shared down-projection | alpha | "
        "dropout | routing | target modules |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, config in sorted(mode_configs.items()):
        targets = config.target_modules
        targets_text = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
        alpha = "r (unscaled)" if config.alpha is None else f"{config.alpha:g}"
        routing = "soft, all experts" if config.top_k is None else f"top-{config.top_k}"
        lines.append(
            f"| {name} | {config.r} | {config.num_experts} | {config.expert_rank} | {config.num_slots} | "
            f"{config.share_down_projection} | {alpha} | {config.dropout:g} | {routing} | {targets_text} |"
        )
    return lines


def mode_card_section(
    mode_configs: dict[str, MoDEConfig], repo_id: Optional[str], base_model: Optional[str]
) -> str:
    """Return the Markdown section with loading instructions and the MoDE settings of each adapter."""
    adapter_source = repo_id or "path/to/this/adapter"
    base_source = base_model or "<base model id>"
    load_lines = [
        "```python",
        "import peft_mode  # registers the MODE adapter type with PEFT; import it before loading",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base_model = AutoModelForCausalLM.from_pretrained("{base_source}")',
        f'model = PeftModel.from_pretrained(base_model, "{adapter_source}")',
        "```",
    ]
    extra_adapters = sorted(name for name in mode_configs if name != "default")
    lines = [
        CARD_START,
        "## MoDE adapter",
        "",
        "This is a Mixture of Dyadic Experts (MoDE) adapter (Ning et al., https://arxiv.org/abs/2408.01505), "
        "saved by peft-mode. PEFT alone cannot load it: install peft-mode and import it before loading.",
        "",
        "```bash",
        "pip install peft-mode",
        "```",
        "",
        *load_lines,
        "",
    ]
    if extra_adapters:
        lines += [
            "Adapters other than `default` are in subfolders; load one with "
            f'`model.load_adapter("{adapter_source}", adapter_name=NAME, subfolder=NAME)`.',
            "",
        ]
    lines += [
        "Settings:",
        "",
        *_settings_table(mode_configs),
        "",
        "The routing is soft and per token, so an adapter with more than one expert cannot be merged into the "
        "base weights; keep it as an adapter at inference time.",
        CARD_END,
    ]
    return "\n".join(lines)


def write_mode_card(
    directory: str, mode_configs: dict[str, MoDEConfig], repo_id: Optional[str] = None
) -> None:
    """Add or replace the MoDE section and tags in ``directory``/README.md, keeping the rest of the card."""
    filename = os.path.join(directory, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard("---\n---\n")
    base_model = card.data.to_dict().get("base_model")
    section = mode_card_section(mode_configs, repo_id, base_model if isinstance(base_model, str) else None)

    text = card.text
    if CARD_START in text and CARD_END in text:
        before, _, rest = text.partition(CARD_START)
        _, _, after = rest.partition(CARD_END)
        text = before + section + after
    else:
        text = section + "\n\n" + text.lstrip("\n")
    card.text = text

    tags = set(card.data.tags or [])
    card.data.tags = sorted(tags.union(CARD_TAGS))
    # A MoDE adapter is loaded through peft, whatever template the card started from.
    card.data.library_name = "peft"
    card.save(filename)
