"""Golden fixtures for herd.image, written by transformers' own Llama 4 image processor.

The reference is `transformers.Llama4ImageProcessor` 5.23.0 (in 5.23 the torchvision backend is the only one; the old
name `Llama4ImageProcessorFast` resolves to it), run in a separate virtual environment because torchvision cannot sit
beside herd's torch. The test images in tests/data/images are committed and are the source of truth; `--images`
redraws them deterministically (byte-identical only with the same Pillow/numpy, so only redraw on purpose).

Regenerate, from the repository root:

    python3 -m venv .refvenv
    .refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 pillow numpy safetensors
    .refvenv/bin/python scripts/make_image_fixtures.py            # writes tests/data/image_fixtures/
    .refvenv/bin/python scripts/make_image_fixtures.py --images   # redraws tests/data/images/ first

What is written (tests/test_image.py reads it):
  reference.json         versions, settings, per image and setting: original size, canvas, resized size, grid
                         (transformers' `aspect_ratios`), tile count; how other entry points treat the RGBA, greyscale
                         and EXIF images; a table of canvas/resize decisions for many (height, width) pairs.
  pixels_uint8.safetensors / pixels_float32.safetensors
                         pixel values for each of torchvision's two uint8 resize paths (see herd.image): full bf16
                         tiles for the tiny setting; for the real 336-px setting, per-tile float64 sum and sum of
                         squares (exact for bf16 values in any summation order) and 256 seeded samples per image.
torchvision resizes uint8 natively on AVX2/AVX512/ARM CPUs and through float32 elsewhere, so the float32 file is made
by rerunning this script with ATEN_CPU_CAPABILITY=default (done automatically on an AVX2/AVX512 machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
FIXTURES = ROOT / "tests" / "data" / "image_fixtures"
SETTINGS = {"real": (336, 16), "tiny": (28, 6)}  # name -> (tile size, max tiles)
N_SAMPLES = 256  # sampled pixel values per image in the real setting


# ---------------------------------------------------------------------------------------------- test images
def _canvas(w: int, h: int, seed: int, lines: int = 24) -> Image.Image:
    """Smooth colour gradients, a few shapes and `lines` thin lines: cheap to store, non-trivial to resample."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (x + 2 * y) / max(w, h) * 3)
    img = Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    for i in range(0, w if lines else 0, max(w // max(lines, 1), 3)):
        draw.line([(i, 0), (i + h // 3, h)], fill=(255, 255, 255), width=1)
    return img


def draw_images() -> None:
    """The committed test images (file names give height x width as stored, before EXIF rotation)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    _canvas(224, 224, 0).save(IMAGES / "square_h224_w224.png", optimize=True)
    _canvas(375, 500, 1, lines=12).save(IMAGES / "portrait_h500_w375.jpg", quality=85)
    _canvas(2000, 100, 2).save(IMAGES / "strip_h100_w2000.png", optimize=True)
    _canvas(1920, 1080, 3, lines=4).save(IMAGES / "hd_h1080_w1920.jpg", quality=30)
    _canvas(1024, 768, 4).save(IMAGES / "photo_h768_w1024.webp", quality=70)
    _canvas(400, 300, 5).convert("L").save(IMAGES / "grey_h300_w400.png", optimize=True)
    rgba = _canvas(320, 256, 6).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 320), (256, 1)).astype(np.uint8)
    alpha[100:150] = 0  # a fully transparent band: its colour only shows if alpha is dropped instead of composited
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(IMAGES / "rgba_h256_w320.png", optimize=True)
    frames = [_canvas(160, 120, 7 + k).quantize(64) for k in range(2)]
    frames[0].save(
        IMAGES / "anim_h120_w160.gif", save_all=True, append_images=frames[1:], transparency=20, duration=100
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display (stored 240x320 -> upright 320x240)
    _canvas(320, 240, 9).save(IMAGES / "exif6_h240_w320.jpg", quality=85, exif=exif)
    _canvas(12, 20, 10).save(IMAGES / "icon_h20_w12.png")


# ---------------------------------------------------------------------------------------------- reference side
def open_upright(path: Path) -> Image.Image:
    """What herd.image.load_image does before its RGB conversion: decode and apply the EXIF orientation, like
    transformers.image_utils.load_image (which then calls convert("RGB"), dropping alpha; the processor, given a PIL
    image, composites alpha on white instead: herd follows the processor)."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def processor(tile: int, max_tiles: int):
    from transformers import Llama4ImageProcessor

    return Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=max_tiles)


def run(proc, image) -> tuple[list[int], object]:
    out = proc(images=[image], return_tensors="pt")
    return [int(v) for v in out["aspect_ratios"][0]], out["pixel_values"]


def plan_of(proc, image) -> dict:
    """Canvas and resize sizes the reference asks torchvision for, recorded by wrapping `resize`."""
    calls = []
    resize = proc.resize

    def spy(img, size, **kw):
        calls.append((int(size.height), int(size.width)))
        return resize(img, size, **kw)

    proc.resize = spy
    grid, pixels = run(proc, image)
    del proc.resize
    return {"resized": list(calls[0]), "grid": grid, "tiles": int(pixels.shape[0])}


def size_table(tile: int, max_tiles: int, n: int, seed: int) -> list[list[int]]:
    """[h, w, canvas_h, canvas_w, resized_h, resized_w] for random and edge-case sizes (cheap blank images)."""
    import torch
    from transformers.models.llama4 import image_processing_llama4 as ref

    rng = np.random.default_rng(seed)
    sides = [1, 2, tile - 1, tile, tile + 1, 2 * tile, 3 * tile + 1, max_tiles * tile, max_tiles * tile + 7]
    pairs = [(h, w) for h in sides for w in sides]
    pairs += [tuple(int(v) for v in np.exp(rng.uniform(0, math.log(12 * tile), 2))) for _ in range(n)]
    proc, rows = processor(tile, max_tiles), []
    calls = []
    proc.resize = lambda img, size, **kw: (
        calls.append((int(size.height), int(size.width)))
        or torch.zeros((*img.shape[:-2], size.height, size.width), dtype=img.dtype)
    )
    for h, w in pairs:
        calls.clear()
        proc(images=[torch.zeros(3, h, w, dtype=torch.uint8)], return_tensors="pt", input_data_format="channels_first")
        canvas = ref.get_best_fit((h, w), torch.tensor(ref.find_supported_resolutions(max_tiles, proc.size)))
        rows.append([h, w, *(int(v) for v in canvas), *calls[0]])
    return rows


def entry_points(proc, path: Path, canonical) -> dict:
    """How the reference treats one image given other ways than herd's (upright PIL, alpha composited on white)."""
    from transformers.image_utils import load_image

    found = {}
    ways = {
        "path string (torchvision decode)": lambda: str(path),
        "PIL as opened (no EXIF transpose)": lambda: Image.open(path),
        "transformers.image_utils.load_image": lambda: load_image(str(path)),
    }
    for name, make in ways.items():
        grid, pixels = run(proc, make())
        same = pixels.shape == canonical.shape
        diff = float((pixels.float() - canonical.float()).abs().max()) if same else None
        found[name] = {"grid": grid, "tiles": int(pixels.shape[0]), "max_abs_diff_vs_herd_convention": diff}
    return found


def resize_path() -> str:
    """Which uint8 resize torchvision takes on this CPU (see herd.image._native_uint8_resize)."""
    from torchvision.transforms.v2.functional import InterpolationMode
    from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu

    return "uint8" if _do_native_uint8_resize_on_cpu(InterpolationMode.BILINEAR) else "float32"


def write_pixels(tag: str, images: list[Path]) -> dict:
    """pixels_<tag>.safetensors; returns the per-image plans (sizes, grids) for reference.json."""
    import torch
    from safetensors.torch import save_file

    tensors, plans = {}, {}
    for name, (tile, max_tiles) in SETTINGS.items():
        proc = processor(tile, max_tiles)
        for path in images:
            img = open_upright(path)
            plan = plan_of(proc, img)
            _, pv = run(proc, img)  # (N, 3, tile, tile) bf16
            plans.setdefault(path.name, {})[name] = {"size": [img.height, img.width], **plan}
            key = f"{name}/{path.stem}"
            if name == "tiny":
                tensors[key] = pv.contiguous()
                continue
            flat = pv.double().flatten(1)
            idx = torch.from_numpy(np.random.default_rng(len(tensors)).choice(pv.numel(), N_SAMPLES, replace=False))
            tensors |= {f"{key}/sum": flat.sum(1), f"{key}/sumsq": (flat * flat).sum(1)}
            tensors |= {f"{key}/idx": idx.sort().values, f"{key}/val": pv.flatten()[idx.sort().values].contiguous()}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURES / f"pixels_{tag}.safetensors"), metadata={"resize_path": tag})
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", action="store_true", help="redraw tests/data/images first")
    parser.add_argument("--pixels-only", action="store_true", help="internal: write only this CPU's pixel file")
    args = parser.parse_args()
    if args.images:
        draw_images()
    import PIL
    import torch
    import torchvision
    import transformers

    images = sorted(p for p in IMAGES.iterdir() if p.is_file())
    tag = resize_path()
    plans = write_pixels(tag, images)
    print(f"wrote pixels_{tag}.safetensors (CPU capability {torch.backends.cpu.get_cpu_capability()})")
    if args.pixels_only:
        return
    if tag == "uint8":  # the other path: force torch's generic CPU kernels, where torchvision goes through float32
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
        subprocess.run([sys.executable, __file__, "--pixels-only"], check=True, env=env)
    else:
        print("warning: this CPU cannot produce pixels_uint8.safetensors; keep the committed one")
    proc = processor(*SETTINGS["real"])
    others = {}
    for stem in ("rgba_h256_w320", "grey_h300_w400", "exif6_h240_w320", "anim_h120_w160"):
        path = next(p for p in images if p.stem == stem)
        others[path.name] = entry_points(proc, path, run(proc, open_upright(path))[1])
    meta = {
        "reference": "transformers.Llama4ImageProcessor (torchvision backend)",
        "versions": {m.__name__: m.__version__ for m in (transformers, torch, torchvision, PIL, np)},
        "settings": {k: {"tile_size": t, "max_tiles": m} for k, (t, m) in SETTINGS.items()},
        "herd_convention": "PIL image, EXIF orientation applied, passed to the processor (alpha composited on white)",
        "images": plans,
        "other_entry_points": others,
    }
    (FIXTURES / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    tables = {k: size_table(t, m, 400, seed=i) for i, (k, (t, m)) in enumerate(SETTINGS.items())}
    lines = [f'"{k}": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]" for k, rows in tables.items()]
    (FIXTURES / "size_tables.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote reference.json and size_tables.json under {FIXTURES}")


if __name__ == "__main__":
    main()
