"""Command-line entries of the comparison: ``peft-mode compare`` and ``peft-mode budget``."""

from __future__ import annotations


def add_compare_commands(commands) -> None:
    """Add the comparison subcommands to the ``peft-mode`` parser."""
