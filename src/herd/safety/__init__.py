"""Safety as Llama 4 shipped it: the Llama Guard prompt and taxonomy, the guard's verdict and unsafe score, and a
LlamaFirewall-shaped scanner over any herd model (a real Llama Guard 4 checkpoint included)."""

from herd.safety.guard import Decision, Guard, GuardScanner, ScanResult
from herd.safety.guard_prompt import (
    GuardOutputError,
    GuardVerdict,
    guard_messages,
    parse_guard_output,
    render_guard_prompt,
)
from herd.safety.taxonomy import DEFAULT, LG3_1B, LG3_8B, LG4, Category, categories

__all__ = ["DEFAULT", "LG3_1B", "LG3_8B", "LG4", "Category", "Decision", "Guard", "GuardOutputError", "GuardScanner",
           "GuardVerdict", "ScanResult", "categories", "guard_messages", "parse_guard_output", "render_guard_prompt"]
