"""docs/configuration.md names every experiment key with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from peft_mode.experiment import SECTIONS, ExperimentConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def documented_rows() -> dict[str, str]:
    """Map each key in the first column of the page's tables to its default column."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([a-z0-9_.]+)` \| (.*?) \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_key_is_documented():
    rows = documented_rows()
    expected = {"model"} | {
        f"{section}.{item.name}" for section, cls in SECTIONS.items() for item in dataclasses.fields(cls)
    }

    assert sorted(expected - set(rows)) == []
    assert sorted(set(rows) - expected) == []


def test_documented_defaults_match_code():
    defaults = ExperimentConfig().to_dict()
    for key, text in documented_rows().items():
        value = defaults
        for part in key.split("."):
            value = value[part]
        if key == "data.prompt_template":
            # The page writes the template's newlines as \n inside a code span.
            assert text.strip("`").replace("\\n", "\n") == value
            continue
        assert yaml.safe_load(text.strip("`")) == value, key
