"""herd.image against transformers' Llama 4 image processor (golden fixtures written by
scripts/make_image_fixtures.py in a separate reference environment), worked size examples, and bad input.

    .venv/bin/python -m pytest tests/test_image.py -q
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file

from herd import image
from herd.image import ImageError, best_canvas, image_token_count, load_image, preprocess, resized_size

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
FIXTURES = ROOT / "tests" / "data" / "image_fixtures"
REF = json.loads((FIXTURES / "reference.json").read_text())
SETTINGS = {k: (v["tile_size"], v["max_tiles"]) for k, v in REF["settings"].items()}
CASES = [(name, setting) for name in REF["images"] for setting in SETTINGS]


# ---------------------------------------------------------------------------------------------- golden fixtures
def resize_path() -> str:
    return "uint8" if image._native_uint8_resize() else "float32"


def check_pixels(name: str, setting: str, pixels: dict[str, torch.Tensor]) -> None:
    """herd's pixel values for one committed image equal the reference's, bit for bit."""
    got = preprocess(IMAGES / name, *SETTINGS[setting]).pixel_values  # (N, C, T, T) bf16
    key = f"{setting}/{Path(name).stem}"
    if setting == "tiny":  # full pixel values stored
        want = pixels[key]
        assert got.shape == want.shape and got.dtype == want.dtype
        diff = (got.float() - want.float()).abs().max().item()
        assert torch.equal(got, want), f"{key}: max abs diff {diff}"
        return
    flat = got.double().flatten(1)  # sums of bf16 values in float64 are exact, whatever the order
    assert torch.equal(flat.sum(1), pixels[f"{key}/sum"]), f"{key}: per-tile sums differ"
    assert torch.equal((flat * flat).sum(1), pixels[f"{key}/sumsq"]), f"{key}: per-tile sums of squares differ"
    samples = got.flatten()[pixels[f"{key}/idx"]]
    diff = (samples.float() - pixels[f"{key}/val"].float()).abs().max().item()
    assert torch.equal(samples, pixels[f"{key}/val"]), f"{key}: sampled pixels differ by up to {diff}"


def check_all_pixels() -> str:
    """Every fixture for the resize path this process takes; returns the path (used from a subprocess too)."""
    path = resize_path()
    pixels = load_file(FIXTURES / f"pixels_{path}.safetensors")
    for name, setting in CASES:
        check_pixels(name, setting, pixels)
    return path


@pytest.fixture(scope="module")
def pixels() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"pixels_{resize_path()}.safetensors")


@pytest.mark.parametrize("name,setting", CASES)
def test_grid_tiles_and_pixels_match_reference(name: str, setting: str, pixels: dict[str, torch.Tensor]) -> None:
    tile, max_tiles = SETTINGS[setting]
    want = REF["images"][name][setting]  # size is after the EXIF orientation
    batch = preprocess(IMAGES / name, tile, max_tiles)
    assert batch.grids == [tuple(want["grid"])] and batch.tiles_per_image == [want["tiles"]]
    assert batch.pixel_values.shape == (want["tiles"], 3, tile, tile) and batch.pixel_values.dtype == torch.bfloat16
    h, w = want["size"]
    assert list(resized_size(h, w, best_canvas(h, w, tile, max_tiles), tile)) == want["resized"]
    check_pixels(name, setting, pixels)


def test_pixels_match_reference_on_generic_cpu_kernels() -> None:
    """torchvision takes its other uint8 resize path (float32 + round) where torch has no AVX2/AVX512 kernels;
    forcing torch's generic kernels in a subprocess checks herd follows it there too."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    code = "import tests.test_image as t; print(t.check_all_pixels())"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    arm = platform.machine() in ("aarch64", "arm64")
    assert run.stdout.strip() == ("uint8" if arm else "float32")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_canvas_and_resize_decisions_match_reference_table(setting: str) -> None:
    tile, max_tiles = SETTINGS[setting]
    rows = json.loads((FIXTURES / "size_tables.json").read_text())[setting]
    got = [[h, w, *(c := best_canvas(h, w, tile, max_tiles)), *resized_size(h, w, c, tile)] for h, w, *_ in rows]
    assert got == rows


@pytest.mark.parametrize(
    "h,w,tile,max_tiles,resized",
    [(596, 4172, 336, 16, (383, 2688)), (46, 161, 28, 6, (28, 97)), (165, 110, 28, 6, (84, 56))],
)
def test_resize_uses_float32_like_the_reference(h: int, w: int, tile: int, max_tiles: int, resized: tuple) -> None:
    """Sizes where float64 arithmetic would give a different answer (checked against the reference)."""
    assert resized_size(h, w, best_canvas(h, w, tile, max_tiles), tile) == resized


# ------------------------------------------------------------------------------------------------ worked examples
@pytest.mark.parametrize(
    "h,w,grid,tiles,tokens,resized",
    [
        (224, 224, (1, 1), 1, 147, (336, 336)),
        (500, 375, (2, 2), 5, 727, (500, 375)),
        (768, 1024, (3, 4), 13, 1887, (768, 1024)),
        (1080, 1920, (3, 5), 16, 2322, (945, 1680)),
        (100, 2000, (1, 6), 7, 1017, (100, 2000)),
    ],
)
def test_worked_examples(h: int, w: int, grid: tuple, tiles: int, tokens: int, resized: tuple) -> None:
    canvas = best_canvas(h, w)
    assert canvas == (grid[0] * 336, grid[1] * 336)
    assert resized_size(h, w, canvas) == resized
    batch = preprocess(Image.new("RGB", (w, h), (10, 200, 30)))
    assert batch.grids == [grid] and batch.tiles_per_image == [tiles]
    assert image_token_count(grid) == tokens


def test_token_counts() -> None:
    assert image.tile_tokens() == image.TOKENS_PER_TILE == 144
    assert image.tile_tokens(28, 14, 0.5) == 1
    for rows in range(1, 5):
        for cols in range(1, 5):
            want = 147 if rows * cols == 1 else 145 * rows * cols + 147
            assert image_token_count((rows, cols)) == want
    assert image_token_count((1, 1), tokens_per_tile=1) == 4
    assert image_token_count((2, 3), tokens_per_tile=1) == 2 * 6 + 4  # per tile 1 patch + 1 separator; thumbnail


def test_canvases_follow_transformers_order() -> None:
    canvases = image.candidate_canvases(1, 4)
    assert canvases == ((1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1))  # the reference docstring's
    assert len(image.candidate_canvases(336, 16)) == 50


# ---------------------------------------------------------------------------------------------- preprocess
def test_batch_layout_dtype_and_thumbnail() -> None:
    files = [IMAGES / "portrait_h500_w375.jpg", IMAGES / "square_h224_w224.png", IMAGES / "strip_h100_w2000.png"]
    batch = preprocess(files)
    assert batch.grids == [(2, 2), (1, 1), (1, 6)] and batch.tiles_per_image == [5, 1, 7]
    singles = torch.cat([preprocess(f).pixel_values for f in files])
    assert torch.equal(batch.pixel_values, singles)
    assert torch.equal(preprocess(files[0], dtype=torch.float32).pixel_values, singles[:5].float())
    # 500x375 is not resized: the padded right column of the top-right tile is -1, the thumbnail is not padded
    tiles = batch.pixel_values[:5].float()
    assert (tiles[1, :, :, 375 - 336 :] == -1).all() and (tiles[1, :, :, : 375 - 336] > -1).any()
    assert (tiles[4] > -1).float().mean() > 0.9
    empty = preprocess([])
    assert empty.pixel_values.shape == (0, 3, 336, 336) and empty.grids == []


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="positive"):
        preprocess(IMAGES / "icon_h20_w12.png", tile_size=0)


# ---------------------------------------------------------------------------------------------- loading
def test_sources_agree() -> None:
    path = IMAGES / "photo_h768_w1024.webp"
    data = path.read_bytes()
    url = "data:image/webp;base64," + base64.b64encode(data).decode()
    arrays = [np.array(load_image(s)) for s in (path, str(path), data, bytearray(data), url, Image.open(path))]
    assert arrays[0].shape == (768, 1024, 3) and arrays[0].dtype == np.uint8
    assert all(np.array_equal(a, arrays[0]) for a in arrays)


def test_modes_become_rgb_like_the_processor() -> None:
    grey = load_image(IMAGES / "grey_h300_w400.png")
    a = np.array(grey)
    assert grey.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    rgba = np.array(load_image(IMAGES / "rgba_h256_w320.png"))  # alpha composited on white
    assert (rgba[100:150] == 255).all()
    raw = np.array(Image.open(IMAGES / "rgba_h256_w320.png"))
    assert not (raw[100:150, :, :3] == 255).all()  # the transparent band stores other colours
    gif = Image.open(IMAGES / "anim_h120_w160.gif")
    transparent = np.array(gif) == gif.info["transparency"]
    assert transparent.any() and (np.array(load_image(IMAGES / "anim_h120_w160.gif"))[transparent] == 255).all()
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, "JPEG")
    assert load_image(cmyk.getvalue()).mode == "RGB"


def test_exif_orientation_applied() -> None:
    stored = Image.open(IMAGES / "exif6_h240_w320.jpg")
    assert stored.size == (320, 240)
    upright = load_image(IMAGES / "exif6_h240_w320.jpg")
    assert upright.size == (240, 320)
    assert np.array_equal(np.array(upright), np.array(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)))


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by one empty data chunk (cheap, never decodable)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD = {
    "truncated png": (lambda: (IMAGES / "square_h224_w224.png").read_bytes()[:9000], "broken or truncated"),
    "truncated jpeg": (lambda: (IMAGES / "hd_h1080_w1920.jpg").read_bytes()[:20000], "broken or truncated"),
    "truncated webp": (lambda: (IMAGES / "photo_h768_w1024.webp").read_bytes()[:20000], "broken or truncated"),
    "garbage bytes": (lambda: b"definitely not an image" * 20, "not a readable image"),
    "empty bytes": (lambda: b"", "empty"),
    "zero-sized PIL image": (lambda: Image.new("RGB", (0, 7)), "zero-sized"),
    "zero-width png header": (lambda: _png(0, 10), "corrupt header"),
    "bomb, Pillow's own limit": (lambda: _png(100_000, 100_000), "decompression bomb"),
    "bomb, herd's limit": (lambda: _png(12_000, 12_000), "144 megapixels, over herd's limit of 128"),
    "data URL not an image": (lambda: "data:text/plain;base64,aGVsbG8=", "bad data URL"),
    "data URL bad base64": (lambda: "data:image/png;base64,@@notbase64@@", "invalid base64"),
    "data URL garbage image": (lambda: "data:image/png;base64," + base64.b64encode(b"x" * 50).decode(), "data URL"),
    "missing file": (lambda: "/nonexistent/dir/cat.png", "does not exist"),
    "directory": (lambda: IMAGES, "not a file"),
    "remote URL": (lambda: "https://example.com/cat.png", "does not fetch URLs"),
    "wrong type": (lambda: 42, "unsupported image source of type int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_raise_image_error(case: str) -> None:
    make, message = BAD[case]
    with pytest.raises(ImageError, match=message):
        load_image(make())
    with pytest.raises(ImageError):
        preprocess([IMAGES / "icon_h20_w12.png", make()])


def test_truncated_stays_an_error_even_if_someone_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="truncated"):
        load_image((IMAGES / "hd_h1080_w1920.jpg").read_bytes()[:20000])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored


@pytest.mark.parametrize("name", ["anim_h120_w160.gif", "icon_h20_w12.png", "exif6_h240_w320.jpg"])
def test_a_cut_file_raises_or_still_holds_the_whole_first_frame(name: str) -> None:
    data = (IMAGES / name).read_bytes()
    full = np.array(load_image(data))
    for cut in range(1, len(data), max(len(data) // 40, 1)):
        try:
            got = np.array(load_image(data[:cut]))
        except ImageError:
            continue
        assert np.array_equal(got, full), f"{name} cut at {cut} of {len(data)} bytes decoded partially"
