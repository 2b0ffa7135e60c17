"""Weights pushed by a trainer: POST /v1/weights swaps a new version of the served model's weights in, between two
engine steps, without restarting the server. This is what online RL needs from its rollout server (the trainer
samples from the server, takes an optimizer step, pushes the new policy); vLLM-based trainers do the same through
vLLM's weight-update hooks (e.g. TRL's `vllm_serve` and OpenRLHF), herd serve does it from files.

- Where from: only a subfolder of the operator's `weights_dir` (as images come only from `media_dir`). The path is
  relative, has no `..`, and resolves (symlinks followed) inside the folder; each weight file must then resolve
  inside the subfolder (herd.formats.hf_integrity.regular_file, through the loader).
- What: a Hugging Face export (herd.formats.hf.export) of the served architecture. Its config.json must equal the
  served model's config (the first differing field is named), and every tensor must be one of the served model's,
  with its shape and dtype (the first one that is not is named). The folder is read twice: that check streams one
  tensor at a time and allocates nothing, then herd.formats.hf.from_pretrained loads a staging copy on the CPU with
  its integrity checks (no tensor missing or twice, finite values). Any refusal leaves the served weights untouched.
- When: the staging copy is copied into the served parameters on the engine thread between two steps
  (EngineWorker.call), so no decode step sees half-old, half-new weights. Copies are in place: the parameters keep
  their storage, so a torch.compiled decode step (SlotBatch with compile) reads the new values without recompiling.
- Requests in flight keep running: their next tokens come from the new weights, attending to keys and values the
  old weights computed. A trainer that needs every token of a rollout from one version waits for (or cancels) its
  requests before it pushes. Quantized models are refused at startup (herd.serve.serve_config): pushed weights
  would have to be quantized again; so are CUDA graphs, whose swaps have not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from herd.formats.hf import from_pretrained, herd_name, iter_tensors, load_config, router_biases
from herd.formats.hf_integrity import regular_file
from herd.model.build import Model


class OutsideError(ValueError):
    """A pushed path that would leave the weights folder (the server answers 403)."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The weights being served: the version the trainer gave them (0: the ones the server started with) and
    the folder they came from, relative to weights_dir (None: the --model checkpoint)."""

    version: int = 0
    path: str | None = None


def resolve(root: Path, rel: str) -> Path:
    """The folder `rel` names inside `root` (already resolved): OutsideError for a path that leaves it, ValueError
    for one that is not a folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise OutsideError(f"path {rel!r} must be a folder inside the server's --weights-dir, relative to it and "
                           "without '..'")
    try:
        real = (root / p).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise ValueError(f"path {rel!r} does not exist in the server's --weights-dir: export the weights there "
                         "first (herd.formats.hf.export)") from None
    if root not in real.parents:
        raise OutsideError(f"path {rel!r} resolves to a place outside the server's --weights-dir (a symlink?), or to "
                           "the folder itself: name a subfolder that holds an export")
    # a folder named like a hub-cache snapshot may read files from ../../blobs (hf_integrity): that must be inside too
    if real.parent.name == "snapshots" and root not in real.parent.parent.parents:
        raise OutsideError(f"path {rel!r} is a hub-cache snapshot whose blobs would lie outside --weights-dir")
    if not real.is_dir():
        raise ValueError(f"path {rel!r} is not a folder: give the folder of an export")
    return real


def _difference(served, pushed, prefix: str = "") -> str | None:
    """The first config field where `pushed` differs from `served` (nested configs followed)."""
    if type(served) is not type(pushed):
        return f"the served model is a {type(served).__name__}, the pushed one a {type(pushed).__name__}"
    for f in dataclasses.fields(served):
        a, b = getattr(served, f.name), getattr(pushed, f.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            found = _difference(a, b, f"{prefix}{f.name}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{f.name} is {b!r}, the served model's is {a!r}"
    return None


def check(model: Model, folder: Path) -> None:
    """ValueError naming the first difference between the export in `folder` and the served `model`: a config
    field, or a tensor that the model lacks or holds with another shape or dtype. Streams the tensors; nothing is
    kept."""
    regular_file(folder / "config.json", folder)  # read from inside the folder only, like the weight files
    diff = _difference(model.config, load_config(folder))
    if diff:
        raise ValueError(f"{folder.name}/config.json does not match the served model: {diff}. Push weights of the "
                         "served architecture (or start a server on the new one)")
    multimodal = model.vision_config is not None
    params = dict(model.named_parameters(remove_duplicate=False))
    biases = router_biases(model)
    for name, t in iter_tensors(folder):
        mine = herd_name(name, multimodal)
        p = params.get(mine, biases.get(mine)) if mine is not None else None
        if p is None:
            raise ValueError(f"{folder.name}: tensor {name} is not one of the served model's tensors")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{folder.name}: tensor {name} has shape {tuple(t.shape)}; the served model's is "
                             f"{tuple(p.shape)}")
        if mine in params and t.dtype != p.dtype:  # router biases are always written as float32 (herd.formats.hf)
            want = str(p.dtype).removeprefix("torch.")
            raise ValueError(f"{folder.name}: tensor {name} is {str(t.dtype).removeprefix('torch.')}; the served "
                             f"model's is {want}: export with dtype=torch.{want}")


def stage(model: Model, folder: Path) -> Model:
    """`check`, then a copy of the export on the CPU at the served dtype (from_pretrained: integrity checks)."""
    check(model, folder)
    return from_pretrained(folder, dtype=next(model.parameters()).dtype, device="cpu")


@torch.no_grad()
def swap(model: Model, staged: Model) -> None:
    """Copy `staged`'s weights and router biases into `model`, in place (on the engine thread, between steps)."""
    new = dict(staged.named_parameters())
    for name, p in model.named_parameters():
        p.copy_(new[name])
    biases = router_biases(staged)
    for name, b in router_biases(model).items():
        b.copy_(biases[name])
