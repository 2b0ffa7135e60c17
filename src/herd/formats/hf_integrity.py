"""Integrity checks for a Hugging Face checkpoint directory: what herd.formats.hf refuses before and while it loads.

A checkpoint is data from elsewhere, so nothing in it is trusted to be what its names say:
- files: every weight file must be a regular file (a FIFO named `model.safetensors` would block `open` forever) that
  resolves inside the checkpoint directory: a symlink or an index entry (absolute path, `..`) pointing elsewhere could
  make herd read any file on the machine as weights. The one exception is the Hugging Face hub cache, whose
  `snapshots/<revision>/` files are symlinks into the repository's `blobs/` (huggingface_hub docs, "Understand
  caching");
- the index: `model.safetensors.index.json` must be `{"weight_map": {tensor name: shard file}}`, one file per name;
- tensors: a floating parameter takes only float32, bfloat16, float16 or float64 data. safetensors stores the dtype as
  a label in the JSON header and only checks that the byte size agrees with it, so an F32 tensor relabelled I32 (same
  size) would otherwise load as integers cast to float. When config.json declares a 16-bit dtype, a tensor of the
  other 16-bit dtype is refused too (BF16 and F16 have the same size, so a swapped label is invisible otherwise);
- values: a NaN or infinity in a weight poisons every token that passes through it. `check_finite` runs once per tensor
  as it is copied: `torch.aminmax` is one pass with no temporary (an element-wise `isfinite` would allocate a bool
  per element), and its min and max are both finite exactly when no element is NaN or infinite (torch's min/max
  propagate NaN);
- memory: the bytes a config needs are counted from the config alone (herd.sizes) and compared with what the device
  has free before anything is allocated, so an absurd config is named instead of failing inside the allocator.

Every refusal is a `CheckpointError` naming the file or tensor and saying what to change.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import torch

from herd.config import Llama4Config, TextConfig
from herd.sizes import count_params, count_vision_params

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what a floating parameter loads from
_HALF = (torch.bfloat16, torch.float16)
INDEX_SHAPE = '{"metadata": {...}, "weight_map": {"tensor name": "shard file name", ...}}'


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match its config."""


# ---- files -----------------------------------------------------------------------------------------------------------
def _allowed_roots(root: Path) -> list[Path]:
    """Where a checkpoint's files may resolve to: the directory itself, and for a hub-cache snapshot
    (`models--org--name/snapshots/<rev>`) the repository's `blobs/`, which the snapshot's symlinks point into."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def regular_file(f: Path, root: Path) -> Path:
    """`f` if it is a regular file (after symlinks) inside `root`; refuses anything else without opening it."""
    real = f.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(f"{f.name} in {root} resolves to {real}, outside the checkpoint directory: herd reads "
                              "weights only from inside it. Copy the file into the directory instead of linking to it")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise CheckpointError(f"{f.name} in {root} cannot be read: {e}") from e
    if not stat.S_ISREG(mode):  # a FIFO or device would block or stream forever
        raise CheckpointError(f"{f.name} in {root} is not a regular file (a FIFO, device or directory): replace it "
                              "with the weight file")
    return real


def exists(f: Path) -> bool:
    """True for anything at `f`, a dangling symlink or a FIFO included (`Path.is_file` is False for both, and
    would let a bad entry be skipped instead of refused)."""
    return os.path.lexists(f)


def read_index(index: Path, root: Path) -> list[Path]:
    """The shard files of `model.safetensors.index.json`, each checked to be a plain relative name inside `root`."""
    regular_file(index, root)

    def no_duplicates(pairs):  # json.loads would keep the last of two entries for one name without a word
        dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        if dup:
            raise CheckpointError(f"{index.name} lists {dup[:4]} more than once: each tensor must be in one shard")
        return dict(pairs)

    try:
        d = json.loads(index.read_text(), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index.name} is not valid JSON ({e}); it should look like {INDEX_SHAPE}") from e
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index.name} has no weight_map object (got {type(wm).__name__}); it should look like "
                              f"{INDEX_SHAPE}")
    bad = [f"{k!r}: {v!r}" for k, v in wm.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{index.name} maps tensors to non-file-name values ({', '.join(bad[:4])}); it should "
                              f"look like {INDEX_SHAPE}")
    files = []
    for name in sorted(set(wm.values())):
        p = Path(name)
        if p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"{index.name} names {name!r}, outside the checkpoint directory: shard entries must "
                                  "be file names inside it")
        files.append(root / p)
    missing = [f.name for f in files if not exists(f)]
    if missing:
        raise CheckpointError(f"{index.name} names shard files that do not exist: {missing}")
    return [regular_file(f, root) for f in files]


# ---- tensors ---------------------------------------------------------------------------------------------------------
def check_dtype(name: str, data: torch.dtype, param: torch.dtype, declared: torch.dtype | None) -> None:
    """Refuse tensor data whose dtype cannot be the floating parameter it loads into (module docstring)."""
    if not param.is_floating_point:
        return
    if data not in FLOAT_DTYPES:
        raise CheckpointError(f"{name} is stored as {str(data).removeprefix('torch.')}, but it is a floating-point "
                              "weight: herd loads it only from float32, bfloat16, float16 or float64 (a relabelled or "
                              "mis-converted file; re-export the checkpoint)")
    if declared in _HALF and data in _HALF and data != declared:
        raise CheckpointError(f"{name} is stored as {str(data).removeprefix('torch.')}, but config.json declares "
                              f"torch_dtype {str(declared).removeprefix('torch.')}: the two 16-bit formats have the "
                              "same size, so the label is wrong or the config is; fix whichever is")


def _all_finite(t: torch.Tensor) -> bool:
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(name: str, loaded: torch.Tensor, data: torch.Tensor) -> None:
    """Refuse a parameter that holds NaN or infinity after loading: from the file, or from a cast that overflowed."""
    if _all_finite(loaded):
        return
    if not _all_finite(data):
        raise CheckpointError(f"{name} holds NaN or infinite values: the checkpoint is corrupt, or was saved from a "
                              "diverged run (load an earlier one, or pass check_finite=False to inspect it)")
    raise CheckpointError(f"{name} overflows {str(loaded.dtype).removeprefix('torch.')} (its values exceed that "
                          "dtype's range): load it at float32 or bfloat16")


# ---- memory ----------------------------------------------------------------------------------------------------------
def weight_bytes(cfg: TextConfig | Llama4Config, dtype: torch.dtype) -> int:
    """Bytes of every parameter of a model built from `cfg` at `dtype` (herd.sizes counts, no model built)."""
    text = cfg.text_config
    n = count_params(text).total
    if isinstance(cfg, Llama4Config):
        n += count_vision_params(cfg.vision_config, text.hidden_size)
    return n * dtype.itemsize


def available_bytes(device: str | torch.device) -> tuple[int, str] | None:
    """(bytes the device can still give, where the figure comes from); None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    if device.type != "cpu":
        return None
    try:  # Linux: what can be allocated without swapping others out, plus free swap (proc(5), /proc/meminfo)
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])
        return kib * 1024, "MemAvailable + SwapFree in /proc/meminfo"
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def check_memory(cfg: TextConfig | Llama4Config, dtype: torch.dtype, device: str | torch.device, what: str) -> None:
    """Refuse, before allocating, a model whose weights need more memory than `device` has."""
    need = weight_bytes(cfg, dtype)
    have = available_bytes(device)
    if have is not None and need > have[0]:
        text = cfg.text_config
        raise CheckpointError(f"{what} needs {_gib(need)} for its weights at {str(dtype).removeprefix('torch.')} "
                              f"(vocab_size {text.vocab_size:,}, hidden_size {text.hidden_size:,}, "
                              f"{text.num_hidden_layers:,} layers), but {device} has {_gib(have[0])} ({have[1]}): "
                              "check config.json, or load at a smaller dtype or on a larger device")
