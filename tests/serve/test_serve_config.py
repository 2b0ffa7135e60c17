"""The serving config (herd.serve.serve_config): defaults as `herd serve` has them, bad values refused with a
ConfigError that names the field, before any weights load, and `herd serve` reporting one as `error: ...`, status 2.

Run: .venv/bin/python -m pytest tests/serve/test_serve_config.py -v
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from herd.config import ConfigError
from herd.serve.serve_config import ServeConfig


def test_defaults_are_the_commands():
    cfg = ServeConfig(model="ckpt")
    assert (cfg.host, cfg.port, cfg.device, cfg.dtype, cfg.quantize, cfg.group_size) == \
        ("127.0.0.1", 8000, "auto", None, None, 128)
    assert (cfg.max_batch, cfg.compile, cfg.cuda_graphs, cfg.warmup) == (32, False, False, True)
    assert (cfg.max_request_bytes, cfg.max_concurrent, cfg.max_images, cfg.max_image_bytes) == \
        (64 * 2**20, 64, 8, 20 * 2**20)
    assert (cfg.shutdown_timeout, cfg.log_level, cfg.api_key, cfg.media_dir, cfg.name) == \
        (30.0, "warning", None, None, None)
    assert cfg.replace(max_batch=4).max_batch == 4 and cfg.max_batch == 32


@pytest.mark.parametrize("field,value", [
    ("max_batch", 0), ("port", 70000), ("port", -1), ("dtype", "float16"), ("quantize", "int3"), ("group_size", 0),
    ("max_concurrent", 0), ("max_images", -1), ("max_request_bytes", 0), ("max_image_bytes", 0),
    ("shutdown_timeout", -1.0), ("log_level", "loud"), ("model", ""),
])
def test_a_bad_value_names_its_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must"):
        ServeConfig(**{"model": "ckpt", field: value})
    with pytest.raises(ConfigError, match=f"^{field} must"):  # replace checks again
        ServeConfig(model="ckpt").replace(**{field: value})


def test_herd_serve_reports_a_bad_value_before_loading(tmp_path):
    out = subprocess.run([sys.executable, "-m", "herd.cli", "serve", "--model", str(tmp_path / "none"),
                          "--max-batch", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: max_batch must be a positive int, got 0" in out.stderr  # not the missing checkpoint
