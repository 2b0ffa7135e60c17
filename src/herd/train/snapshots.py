"""Training snapshots (a run's checkpoints): everything needed to continue a run bit for bit, written so a crash
never corrupts one and damage is found before it is resumed from; and reading a snapshot's (or a Hugging Face
directory's) weights as a model, to start a run from or to distill from.

Layout: `out_dir/ckpt/step_00000100/{model,optim,state}.pt` + `manifest.json`. A checkpoint is written into a hidden
temporary directory (`.tmp-step_...`); the manifest (each file's byte size and SHA-256) is written last; every file
and the directory are fsynced, and only then is the directory renamed into place with `os.replace` - atomic on
POSIX. A `step_*` directory therefore either holds a whole checkpoint or does not exist, and the newest one is the
one to resume from (no pointer file can disagree with the directories). Leftover temporary directories from a
killed save are removed on the next save or resume. Only the newest `keep_last` are kept.

Integrity: loading checks the files against the manifest, and any damage (a truncated or flipped file, junk, a
stray directory) raises CheckpointCorrupt naming the file and the fault, never a reader's traceback. Resuming takes
the newest intact checkpoint, warns about each damaged newer one and moves those into `ckpt/skipped/` (never
deleted); with none intact it refuses. Checkpoints from before manifests are used with a warning when they load. A
full disk during a save removes the partial checkpoint, keeps the older ones, and raises CheckpointDiskFull.

Contents: model weights (state_dict), AdamW state, the schedule position, the data position (the packer's
state_dict), RNG states (torch, CUDA, Python `random`, NumPy), the MoE routers' `expert_bias` buffers (kept out of the
model's state_dict, yet they decide routing), the step, the training config and the model config. The Hugging Face
export is herd.formats.hf's job. Only tensors and plain containers are stored, so loading uses
`torch.load(weights_only=True)`: a checkpoint cannot run code (the same rule as torchtitan's and nanochat's loaders).

Under FSDP2 the full (unsharded) state dicts are gathered with torch.distributed.checkpoint's state_dict helpers
and rank 0 writes them; every rank reads the files back and keeps its shard.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from herd.formats.hf import CheckpointError

PREFIX, TMP, MANIFEST, SKIPPED = "step_", ".tmp-", "manifest.json", "skipped"
NAMES = ("model", "optim", "state")  # the files of a checkpoint, {name}.pt
_CHUNK = 1 << 20


class CheckpointCorrupt(CheckpointError):
    """A checkpoint failed its checks (or no checkpoint of a run is intact); the message says what is wrong."""


class CheckpointDiskFull(OSError):
    """The disk filled up while a checkpoint was written: the partial one is removed, the previous ones are kept."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---- directories -----------------------------------------------------------------------------------------------------
def _step_of(p: Path) -> int:
    return int(p.name[len(PREFIX):])


def step_dirs(root: str | Path) -> list[Path]:
    """Checkpoint directories under root (out_dir/ckpt), oldest first (whole ones, unless damaged after the save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def latest(root: str | Path) -> Path | None:
    return (step_dirs(root) or [None])[-1]


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


# ---- writing ---------------------------------------------------------------------------------------------------------
class _Sink:
    """The file torch.save writes into, hashing and counting the bytes on their way to disk. Handing torch a Python
    file (not a path) also keeps the OS error: when its own C++ writer hits a full disk, torch only reports
    `unexpected pos N vs M` (PyTorchFileWriter's position check), with no errno."""

    def __init__(self, path: Path):
        self.path, self.file, self.sha, self.size, self.error = path, open(path, "wb"), hashlib.sha256(), 0, None

    def __repr__(self) -> str:
        return f"<checkpoint file {self.path}>"

    def write(self, b) -> int:
        try:
            n = self.file.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(b)
        self.size += len(b)
        return n

    def flush(self) -> None:
        self.file.flush()


def _save_file(obj, path: Path) -> dict:
    """torch.save into path, fsynced; its manifest entry. Raises the disk's OSError where one caused the failure."""
    sink = _Sink(path)
    try:
        torch.save(obj, sink)
        sink.flush()  # a full disk may also show only here, or in fsync (delayed allocation, network filesystems)
        os.fsync(sink.file.fileno())
    except Exception:
        if sink.error is not None:  # the cause, not the `unexpected pos` torch reports after it
            raise sink.error from None
        raise
    finally:
        with contextlib.suppress(OSError):
            sink.file.close()
    return {"bytes": sink.size, "sha256": sink.sha.hexdigest()}


def _disk_full(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:  # torch may wrap the disk's OSError: look down the chain
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _tensor_bytes(obj) -> int:
    """The tensor bytes in a nest of dicts and lists: a lower bound on its checkpoint file's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    return sum(_tensor_bytes(v) for v in items)


def _write(tmp: Path, files: dict[str, dict]) -> None:
    """Every file, then the manifest - written last, so a directory with one holds a complete save. SHA-256
    (hashlib) because it is the digest Hugging Face Hub and `sha256sum` show, so a file can be checked by hand;
    torch's zip records carry CRC32s, but torch.load does not check them (a flipped bit loads silently)."""
    manifest = {f"{name}.pt": _save_file(obj, tmp / f"{name}.pt") for name, obj in files.items()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"format": 1, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)


def save(root: str | Path, step: int, files: dict[str, dict], keep_last: int) -> Path:
    """Write files {name: object} as name.pt plus a manifest into root/step_{step}, atomically; keep the newest
    keep_last. A full disk removes the partial checkpoint and raises CheckpointDiskFull; the older ones stay."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{final.name}"
    tmp.mkdir()
    try:
        _write(tmp, files)
    except Exception as e:
        written = sum(f.stat().st_size for f in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(e):
            raise
        need = max(sum(_tensor_bytes(o) for o in files.values()), written) / 2**20
        free = shutil.disk_usage(root).free / 2**20
        keep = latest(root)
        raise CheckpointDiskFull(
            f"disk full: the checkpoint of step {step} needs about {need:.1f} MiB in {root}, and the disk failed "
            f"after {written / 2**20:.1f} MiB ({free:.1f} MiB free now). The partial checkpoint was removed; "
            + (f"the previous ones are intact (newest {keep.name}). " if keep else "no earlier checkpoint exists. ")
            + "Free space there (or lower keep_last, or move out_dir to a larger disk), then resume the run.") from e
    if final.exists():  # the same step saved again (e.g. re-running an end-of-run save): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in step_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading, checked ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path, names: tuple[str, ...] = NAMES) -> bool:
    """Check the named files against the checkpoint's manifest: True when they match it, False when it has none
    (written before herd wrote manifests, so it cannot be verified); raises CheckpointCorrupt naming what differs."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
        listed = {k: (int(v["bytes"]), str(v["sha256"])) for k, v in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"{path}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    wrong = []
    for f in (path / f"{n}.pt" for n in names):
        size, digest = listed.get(f.name, (None, None))
        if size is None:
            wrong.append(f"{f.name} is not in its {MANIFEST}")
        elif not f.is_file():
            wrong.append(f"{f.name} is missing")
        elif f.stat().st_size != size:
            wrong.append(f"{f.name} is {f.stat().st_size} bytes, its manifest says {size} (truncated or overwritten)")
        elif _sha256(f) != digest:
            wrong.append(f"{f.name} fails its SHA-256 checksum (its bytes changed after it was written)")
    if wrong:
        raise CheckpointCorrupt(f"{path}: " + "; ".join(wrong))
    return True


def load(path: str | Path, names: tuple[str, ...] = NAMES) -> dict[str, dict]:
    """{name: object} for the named files of a checkpoint directory, checked against its manifest first (where it
    has one); weights-only unpickling. Any damage raises CheckpointCorrupt, never the reader's own error."""
    path = Path(path)
    verify(path, names)
    out = {}
    for f in (path / f"{n}.pt" for n in names):
        if not f.is_file():
            raise CheckpointCorrupt(f"{path}: {f.name} is missing")
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's zip reader, EOFError, UnpicklingError, struct.error...: all "unreadable"
            why = ": ".join([type(e).__name__] + str(e).strip().splitlines()[:1])[:200]
            raise CheckpointCorrupt(f"{path}: {f.name} cannot be read ({why})") from None
        if not isinstance(obj, dict):
            raise CheckpointCorrupt(f"{path}: {f.name} holds a {type(obj).__name__}, not a checkpoint's dict")
        out[f.stem] = obj
    return out


def resume_point(root: str | Path, names: tuple[str, ...] = NAMES,
                 set_aside: bool = False) -> tuple[Path | None, dict | None, list[str]]:
    """(the newest intact checkpoint under root, its files, warnings to print): damaged newer ones are skipped, each
    with a warning saying what is wrong. (None, None, []) when root holds none; CheckpointCorrupt when none is intact.

    A checkpoint without a manifest was written before herd wrote them: it is used (with a warning) when it loads,
    unless an older one has a manifest - then it is no whole save of herd's (a stray or half-copied directory).
    set_aside (the run about to continue from it) moves the skipped ones into root/skipped: never deleted, there to
    inspect, and out of the way of the run's own saves of those steps and of keep_last, which could otherwise prune
    the newest intact checkpoint while keeping damaged newer ones."""
    root = Path(root)
    dirs, wrong = step_dirs(root), []
    for i in range(len(dirs) - 1, -1, -1):
        d = dirs[i]
        if not (d / MANIFEST).is_file() and any((o / MANIFEST).is_file() for o in dirs[:i]):
            wrong.append(f"{d}: no {MANIFEST}, though older checkpoints have one (not a whole save by herd)")
            continue
        try:
            files = load(d, names)
            if "state" in files and files["state"].get("step") != _step_of(d):
                raise CheckpointCorrupt(f"{d}: state.pt is of step {files['state'].get('step')}, not {_step_of(d)}")
        except CheckpointCorrupt as e:
            wrong.append(str(e))
            continue
        notes = [f"warning: skipped damaged checkpoint {w}" for w in wrong]
        if set_aside and wrong:
            notes += [f"warning: moved {p} to {_move_aside(p)} for inspection" for p in dirs[i + 1:]]
        if not (d / MANIFEST).is_file():
            notes.append(f"warning: {d} has no {MANIFEST} (written by an older herd), so it cannot be verified; "
                         "it loaded cleanly")
        return d, files, notes
    if wrong:
        raise CheckpointCorrupt(f"no intact checkpoint in {root}: " + "; ".join(wrong)
                                + ". Restore one from a backup, or start the run again in a new out_dir (the damaged "
                                "ones are left as they are)")
    return None, None, []


def _move_aside(d: Path) -> Path:
    (d.parent / SKIPPED).mkdir(exist_ok=True)
    dest, n = d.parent / SKIPPED / d.name, 1
    while dest.exists():
        dest, n = d.parent / SKIPPED / f"{d.name}.{n}", n + 1
    os.replace(d, dest)
    return dest


def load_snapshot(path: str | Path, names: tuple[str, ...] = NAMES) -> tuple[Path, dict] | None:
    """(step dir, files) for the training checkpoint a path means - a step dir itself, else the newest intact one of
    a ckpt dir or of a run's out_dir (warnings printed for damaged ones skipped); None when it holds none."""
    p = Path(path)
    if (p / "state.pt").is_file() or (p / MANIFEST).is_file():
        return p, load(p, names)
    for root in (p, p / "ckpt"):
        if step_dirs(root):
            d, files, notes = resume_point(root, names)
            for n in notes:
                print(n, flush=True)
            return d, files
    return None


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
    from herd.formats.hf import from_pretrained
    from herd.model.build import allocate

    found = load_snapshot(path, ("model", "state"))
    if found is not None:
        files = found[1]
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


def init_vision_config(path: str | Path):
    """The VisionConfig of the model at `path` (a training run / snapshot or a Hugging Face dir), None for a text
    model; read from its config, without the weights."""
    from herd.formats.hf import load_config

    found = load_snapshot(path, ("state",))
    mcfg = model_config(found[1]["state"]["model_config"]) if found is not None else load_config(path)
    return mcfg.vision_config


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
