"""Comparison of LoRA, MoLoRA, MoLoRA-SD and MoDE at matched parameter budgets."""
