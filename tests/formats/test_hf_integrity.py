"""Damaged and hostile checkpoint directories are refused with a clear error, never loaded silently, never hang:
relabelled dtypes, NaN/inf weights, a tensor in two shards, files that escape the directory (index paths, symlinks),
FIFOs, malformed indexes, configs too large for memory, and missing or malformed tokenizer files (also through
`herd serve` and `herd generate`, which must end with `error: ...` before anything starts).

Every bad checkpoint is built for real: a tiny model written by herd.save_pretrained (or `herd init`), then damaged.

Run: .venv/bin/python -m pytest tests/formats/test_hf_integrity.py -v
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd.config import ConfigError
from herd.formats import hf_integrity
from herd.formats.hf import CheckpointError
from herd.tokenizer import Tokenizer, TokenizerError, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return herd.build_model(herd.preset("tiny"), seed=1).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A float32 single-file checkpoint with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("ckpt")
    herd.save_pretrained(model, path)
    tiny_tokenizer().save(path)
    return path


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_header(f, fn):
    """Rewrite a safetensors JSON header in place, keeping its length (padded with spaces, as the format allows), so
    the data offsets stay valid: what a hand-edited or hostile file looks like."""
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    data[8:8 + n] = new + b" " * (n - len(new))
    f.write_bytes(bytes(data))


def _edit_tensors(f, fn):
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


# ---- dtypes --------------------------------------------------------------------------------------------------------
def test_float_weight_relabelled_as_int_is_refused(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    _edit_header(bad / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="I32"))  # same byte size
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is stored as int32, but it is a floating"):
        herd.from_pretrained(bad)


def test_half_precision_label_swap_is_refused(model, tmp_path):
    herd.save_pretrained(model, tmp_path, dtype=torch.bfloat16)  # config.json declares torch_dtype bfloat16
    assert herd.from_pretrained(tmp_path).dtype == torch.bfloat16
    _edit_header(tmp_path / "model.safetensors", lambda h: h["model.layers.0.self_attn.q_proj.weight"]
                 .update(dtype="F16"))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight is stored as float16, but config\.json declares "
                                              r"torch_dtype bfloat16"):
        herd.from_pretrained(tmp_path)


# ---- values --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused(saved, tmp_path, value):
    bad = _copy(saved, tmp_path / "bad")
    name = "model.layers.1.feed_forward.experts.down_proj"
    _edit_tensors(bad / "model.safetensors", lambda sd: sd[name].view(-1).__setitem__(7, value))
    with pytest.raises(CheckpointError, match=rf"{name} holds NaN or infinite values"):
        herd.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="NaN"):  # the same at another dtype (checked after the cast)
        herd.from_pretrained(bad, dtype=torch.bfloat16)
    herd.from_pretrained(bad, check_finite=False)  # still inspectable on request


def test_overflow_in_the_target_dtype_is_named(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    _edit_tensors(bad / "model.safetensors", lambda sd: sd["model.norm.weight"].__setitem__(0, 1e6))
    herd.from_pretrained(bad)  # finite at float32
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight overflows float16"):
        herd.from_pretrained(bad, dtype=torch.float16)


# ---- shards and indexes --------------------------------------------------------------------------------------------
def test_tensor_in_two_shards_is_refused(model, tmp_path):
    herd.save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    first, last = sorted(set(index.values()))[0], sorted(set(index.values()))[-1]
    stale = next(n for n, f in index.items() if f == first)
    _edit_tensors(tmp_path / last, lambda sd: sd.__setitem__(stale, torch.zeros_like(model.state_dict()[stale])))
    with pytest.raises(CheckpointError, match=rf"tensor {stale} is in both {first} and {last}"):
        herd.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()  # no index: the shards are globbed, same rule
    with pytest.raises(CheckpointError, match=rf"tensor {stale} is in both"):
        herd.from_pretrained(tmp_path)


def test_index_listing_a_tensor_twice_is_refused(model, tmp_path):
    herd.save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    f = tmp_path / "model.safetensors.index.json"
    text = f.read_text()
    f.write_text(text.replace('"weight_map": {', '"weight_map": {"model.norm.weight": "model-00001-of-00009.x", ', 1))
    with pytest.raises(CheckpointError, match=r"lists \['model\.norm\.weight'\] more than once"):
        herd.from_pretrained(tmp_path)


@pytest.mark.parametrize("weight_map", [
    ["model.safetensors"], {"model.norm.weight": 3}, {"model.norm.weight": None}, {"model.norm.weight": ""}, None, {},
    "model.safetensors",
])
def test_malformed_weight_map_says_what_it_should_look_like(saved, tmp_path, weight_map):
    bad = _copy(saved, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r'should look like \{"metadata": \{\.\.\.\}, "weight_map": \{"tensor'):
        herd.from_pretrained(bad)


def test_index_not_json_or_not_an_object(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    for text in ("{ not json", "[1, 2]"):
        (bad / "model.safetensors.index.json").write_text(text)
        with pytest.raises(CheckpointError, match="should look like"):
            herd.from_pretrained(bad)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_index_naming_a_file_outside_the_directory_is_refused(saved, tmp_path, where):
    outside = _copy(saved, tmp_path / "outside")  # a perfectly good weight file, just not this checkpoint's
    bad = _copy(saved, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    target = str(outside / "model.safetensors") if where == "absolute" else "../outside/model.safetensors"
    wm = {n: target for n in load_file(outside / "model.safetensors")}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        herd.from_pretrained(bad)


# ---- files: symlinks and FIFOs -------------------------------------------------------------------------------------
def test_symlink_out_of_the_directory_is_refused(saved, tmp_path):
    outside = _copy(saved, tmp_path / "outside")
    bad = _copy(saved, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors in .* resolves to .*outside the checkpoint"):
        herd.from_pretrained(bad)


def test_symlinks_inside_the_directory_and_the_hub_cache_load(saved, model, tmp_path):
    inside = _copy(saved, tmp_path / "inside")
    (inside / "weights").mkdir()
    (inside / "model.safetensors").rename(inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to("weights/real.safetensors")
    assert torch.equal(herd.from_pretrained(inside).model.norm.weight, model.model.norm.weight)
    # huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    snap = _copy(saved, repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    (snap / "model.safetensors").rename(repo / "blobs" / "0123abcd")
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    assert torch.equal(herd.from_pretrained(snap).model.norm.weight, model.model.norm.weight)


def test_fifo_in_place_of_a_weight_file_is_refused_without_blocking(saved, tmp_path):
    """Opening a FIFO for reading waits for a writer, and safetensors' open holds the GIL while it waits, so the loads
    run in a subprocess that a timeout can end."""
    dirs = []
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        bad = _copy(saved, tmp_path / name)
        (bad / "model.safetensors").unlink()
        os.mkfifo(bad / name)
        dirs.append(str(bad))
    script = ("import sys, herd\n"
              "for d in sys.argv[1:]:\n"
              "    try:\n"
              "        herd.from_pretrained(d)\n"
              "    except herd.CheckpointError as e:\n"
              "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    for d, line in zip(dirs, lines, strict=True):
        assert line.startswith(f"{os.path.basename(d)} in {d} is not a regular file"), line


# ---- configs -------------------------------------------------------------------------------------------------------
def test_weight_bytes_match_a_real_model(model):
    assert hf_integrity.weight_bytes(model.config, torch.float32) == sum(p.numel() * 4 for p in model.parameters())
    mm = herd.build_model(herd.multimodal_preset("tiny"), device="meta")
    assert hf_integrity.weight_bytes(mm.config, torch.bfloat16) == sum(p.numel() * 2 for p in mm.parameters())


def test_config_too_large_for_memory_is_refused_before_allocating(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    d = json.loads((bad / "config.json").read_text())
    d["vocab_size"] = 10**9  # 2 x 1e9 x 64 floats = 477 GiB of embeddings
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"needs 47\d\.\d GiB for its weights at float32 \(vocab_size "
                                              r"1,000,000,000.*but cpu has .* \(MemAvailable"):
        herd.from_pretrained(bad)


def test_memory_check_compares_with_what_the_device_has(saved, monkeypatch):
    monkeypatch.setattr(hf_integrity, "available_bytes", lambda device: (100_000, "a test's figure"))
    with pytest.raises(CheckpointError, match=r"needs .* MiB .* but cpu has 0\.1 MiB \(a test's figure\)"):
        herd.from_pretrained(saved)


@pytest.mark.parametrize("key,value", [("vocab_size", -1), ("hidden_size", 0), ("num_hidden_layers", -4),
                                       ("intermediate_size", 0), ("head_dim", -2), ("num_local_experts", 0)])
def test_absurd_sizes_are_config_errors(saved, tmp_path, key, value):
    bad = _copy(saved, tmp_path / "bad")
    d = json.loads((bad / "config.json").read_text())
    d[key] = value
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{key} must be a positive int, got {value}"):
        herd.from_pretrained(bad)


# ---- tokenizer files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,match", [
    ("missing", r"has no tokenizer\.json"),
    ("garbage", r"tokenizer\.json is not a valid tokenizer\.json"),
    ("truncated", r"tokenizer\.json is not a valid tokenizer\.json"),
    ("no_specials", r"tokenizer\.json: '<\|begin_of_text\|>' is not a special token"),
    ("fifo", r"tokenizer\.json is not a regular file"),
    ("bad_config", r"tokenizer_config\.json is not valid JSON"),
    ("config_list", r"tokenizer_config\.json must hold a JSON object"),
])
def test_bad_tokenizer_files_are_named(saved, tmp_path, damage, match):
    bad = _copy(saved, tmp_path / "bad")
    f = bad / "tokenizer.json"
    if damage == "missing":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"\x00\xffnot json at all")
    elif damage == "truncated":
        f.write_text(f.read_text()[:5000])
    elif damage == "no_specials":
        d = json.loads(f.read_text())
        d["added_tokens"] = []
        f.write_text(json.dumps(d))
    elif damage == "fifo":
        f.unlink()
        os.mkfifo(f)
    elif damage == "bad_config":
        (bad / "tokenizer_config.json").write_text("{ nope")
    else:
        (bad / "tokenizer_config.json").write_text("[]")
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_pretrained(bad)


# ---- through the CLI -----------------------------------------------------------------------------------------------
def _herd(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "herd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("damage", ["missing", "malformed"])
def test_serve_with_a_bad_tokenizer_exits_before_listening(saved, tmp_path, damage):
    from tests.serve.server_process import free_port

    bad = _copy(saved, tmp_path / "bad")
    if damage == "missing":
        (bad / "tokenizer.json").unlink()
    else:
        (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    out = _herd("serve", "--model", bad, "--port", free_port(), "--device", "cpu")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "serving" not in out.stdout
    assert out.stderr.startswith("error: ") and "tokenizer.json" in out.stderr


def test_generate_with_bad_files_says_error(saved, tmp_path, capsys):
    from herd.cli import main

    bad = _copy(saved, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("[]")
    assert main(["generate", "--model", str(bad), "--device", "cpu", "--max-new-tokens", "1"]) == 2
    assert "is not a valid tokenizer.json" in capsys.readouterr().err
    _edit_tensors(bad / "model.safetensors", lambda sd: sd["model.norm.weight"].__setitem__(0, float("nan")))
    assert main(["chat", "--model", str(bad), "--device", "cpu"]) == 2
    assert "error: model.norm.weight holds NaN" in capsys.readouterr().err
