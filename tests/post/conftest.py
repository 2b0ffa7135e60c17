"""Fixtures shared by the post-training tests."""

from __future__ import annotations

import pytest

from herd.cli import main as herd_cli


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """(a random tiny multimodal checkpoint, a random tiny text checkpoint), written by `herd init`."""
    root = tmp_path_factory.mktemp("inits")
    assert herd_cli(["init", "--preset", "tiny", "--multimodal", "--out", str(root / "mm")]) == 0
    assert herd_cli(["init", "--preset", "tiny", "--out", str(root / "text")]) == 0
    return root / "mm", root / "text"
