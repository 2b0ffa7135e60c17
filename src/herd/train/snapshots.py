"""Training snapshots (a run's checkpoints): everything needed to continue a run bit for bit, written so a crash
never corrupts one; and reading a snapshot's (or a Hugging Face directory's) weights as a model, to start a run from
or to distill from.

Layout: `out_dir/ckpt/step_00000100/{model,optim,state}.pt`. A checkpoint is written into a hidden temporary
directory (`.tmp-step_...`), every file and the directory are fsynced, and only then is the directory renamed into
place with `os.replace` - atomic on POSIX. A `step_*` directory therefore either holds a whole checkpoint or does not
exist, and the newest one is the one to resume from (no pointer file can disagree with the directories). Leftover
temporary directories from a killed save are removed on the next save or resume. Only the newest `keep_last` are kept.

Contents: model weights (state_dict), AdamW state, the schedule position, the data position (the packer's
state_dict), RNG states (torch, CUDA, Python `random`, NumPy), the MoE routers' `expert_bias` buffers (kept out of the
model's state_dict, yet they decide routing), the step, the training config and the model config. The Hugging Face
export is herd.formats.hf's job. Only tensors and plain containers are stored, so loading uses
`torch.load(weights_only=True)`: a checkpoint cannot run code (the same rule as torchtitan's and nanochat's loaders).

Under FSDP2 the full (unsharded) state dicts are gathered with torch.distributed.checkpoint's state_dict helpers
and rank 0 writes them; every rank reads the files back and keeps its shard.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

PREFIX, TMP = "step_", ".tmp-"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---- directories -----------------------------------------------------------------------------------------------------
def step_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under root (out_dir/ckpt), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: str | Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def resolve(path: str | Path) -> Path | None:
    """The checkpoint a path means: a step dir itself, the newest one of a ckpt dir, or of a run's out_dir."""
    p = Path(path)
    if (p / "state.pt").is_file():
        return p
    return latest(p) or latest(p / "ckpt")


def clean_partial(root: str | Path) -> None:
    """Remove temporary directories a killed save left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP):
                shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | Path, step: int, files: dict[str, dict], keep_last: int) -> Path:
    """Write files {name: object} as name.pt into root/step_{step}, atomically; keep the newest keep_last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{final.name}"
    tmp.mkdir()
    for name, obj in files.items():
        torch.save(obj, tmp / f"{name}.pt")
        _fsync(tmp / f"{name}.pt")
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. re-running an end-of-run save): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, names: tuple[str, ...] = ("model", "optim", "state")) -> dict[str, dict]:
    """{name: object} for the named files of a checkpoint directory; weights-only unpickling."""
    path = Path(path)
    return {n: torch.load(path / f"{n}.pt", map_location="cpu", weights_only=True) for n in names}


# ---- model and optimizer state (plain or FSDP2-sharded) -------------------------------------------------------------
def model_state(model: torch.nn.Module) -> dict:
    """Full model state dict on CPU (gathered from all ranks under FSDP2)."""
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_model_state(model: torch.nn.Module, sd: dict) -> None:
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(sd)


def optim_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optim_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)


# ---- weights in and out: starting points (init, teacher) and the final Hugging Face export --------------------------
def model_config(d: dict):
    """A TextConfig or Llama4Config from its `dataclasses.asdict` form (as training checkpoints store it)."""
    import herd

    if "text_config" not in d:
        return herd.TextConfig(**d)
    from herd.config import Llama4Config, VisionConfig

    rest = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    return Llama4Config(text_config=herd.TextConfig(**d["text_config"]),
                        vision_config=VisionConfig(**d["vision_config"]), **rest)


def load_model(path: str | Path, multimodal: bool = False):
    """(model, its config) from a training snapshot (weights + expert biases) or a Hugging Face dir (herd.formats.hf:
    biases included): the text model, or the multimodal one where the checkpoint has a vision tower.
    multimodal=True requires one."""
    import herd
    from herd.formats.hf import CheckpointError, from_pretrained
    from herd.model.build import allocate

    step_dir = resolve(path)
    if step_dir is not None:
        files = load(step_dir, ("model", "state"))
        mcfg = model_config(files["state"]["model_config"])
        model = allocate(herd.build_model(mcfg, device="meta"), "cpu")
        model.load_state_dict(files["model"])
        set_expert_biases(model, files["state"]["expert_bias"])
    else:
        model = from_pretrained(path, dtype=torch.float32)
        mcfg = model.config
    if multimodal and mcfg.vision_config is None:
        raise CheckpointError(f"{path} is a text-only model: training on images (image_rows > 0) needs one with a "
                              "vision tower (start from a multimodal checkpoint, or from scratch)")
    return model.train(), mcfg


def plain_model(sd: dict, biases: dict, mcfg):
    """A plain (unsharded, unwrapped) model on the CPU from a full state dict and its routers' biases: what is
    exported, whatever wrapped the trained one (FSDP2, FP8 modules)."""
    import herd
    from herd.model.build import allocate

    model = allocate(herd.build_model(mcfg, device="meta"), "cpu")
    model.load_state_dict(sd)
    set_expert_biases(model, biases)
    return model.eval()


# ---- expert biases and RNG -----------------------------------------------------------------------------------------
def _routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "expert_bias")}


def expert_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{'model.layers.0.feed_forward.router.expert_bias': (E,)} for every MoE router."""
    return {f"{name}.expert_bias": m.expert_bias.detach().cpu().clone() for name, m in _routers(model).items()}


def set_expert_biases(model: torch.nn.Module, biases: dict[str, torch.Tensor]) -> None:
    routers = _routers(model)
    names = {f"{n}.expert_bias" for n in routers}
    if set(biases) != names:
        raise ValueError(f"checkpoint expert biases {sorted(biases)} do not match the model's routers {sorted(names)}")
    with torch.no_grad():
        for name, m in routers.items():
            m.expert_bias.copy_(biases[f"{name}.expert_bias"])


def rng_state() -> dict:
    """RNG states as tensors and plain values (weights_only-safe)."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
