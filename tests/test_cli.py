"""The `herd` command end to end, as a user runs it (subprocesses, real files).

Run: .venv/bin/python -m pytest tests/test_cli.py -v
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

IMAGES = Path(__file__).parent / "data" / "images"


def herd(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "herd.cli", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinymm")
    herd("init", "--preset", "tiny", "--multimodal", "--out", path)
    assert (path / "tokenizer.json").is_file() and (path / "preprocessor_config.json").is_file()
    return path


def test_info_of_a_checkpoint(ckpt):
    out = herd("info", "--model", ckpt).stdout
    assert "vision parameters" in out and "28-px tiles (up to 6), 4 tokens per tile" in out


def test_generate_from_a_chat_prompt_with_images(ckpt):
    out = herd("generate", "--model", ckpt, "--prompt", "What is this?", "--image", IMAGES / "square_h224_w224.png",
               "--image", IMAGES / "strip_h100_w2000.png", "--max-new-tokens", "6", "--temperature", "0")
    assert "new tokens in" in out.stderr
    # 1x1 image: 4 patches + 3 markers; the strip is 1x6 tiles + thumbnail; the rest is chat scaffolding and text
    prompt_tokens = int(out.stderr.split("[")[1].split()[0])
    assert prompt_tokens > (4 + 3) + (5 * 6 + 4 + 7)


def test_generate_from_token_ids(ckpt):
    out = herd("generate", "--model", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert "new ids:" in out.stdout and "[3 prompt tokens, 5 new tokens" in out.stderr


def test_bad_inputs_fail_cleanly(ckpt, tmp_path):
    bad = herd("info", "--model", tmp_path / "none", ok=False)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    bad = herd("generate", "--model", ckpt, "--prompt", "x", "--image", broken, ok=False)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    text_only = tmp_path / "text"
    herd("init", "--preset", "tiny", "--out", text_only)
    bad = herd("generate", "--model", text_only, "--prompt", "x", "--image", IMAGES / "square_h224_w224.png", ok=False)
    assert bad.returncode == 2 and "text-only model" in bad.stderr
