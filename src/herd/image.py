"""Llama 4 image preprocessing: an image source in, normalised tiles out, exactly as transformers 5.23 does it.

The reference is `transformers.models.llama4.image_processing_llama4.Llama4ImageProcessor` (in 5.23 the torchvision
backend is its only implementation; `Llama4ImageProcessorFast` is a deprecated alias of it), in huggingface/
transformers src/transformers/models/llama4/image_processing_llama4.py.

Steps, for an image of H x W pixels and square tiles of `tile_size` (336 for Scout/Maverick, smaller in tiny presets):
1. Decode with Pillow (PNG, JPEG, WebP, GIF first frame, ...), apply the EXIF orientation, convert to RGB. Images with
   alpha (RGBA, LA, PA, or a transparent palette index / colour key) are composited onto WHITE, as the processor's
   `convert_to_rgb` does for PIL input. Given a path, URL or base64 string instead, transformers decodes with
   torchvision (alpha dropped, every GIF frame a separate image), and its pipelines' `load_image` drops alpha too;
   tests/data/image_fixtures/reference.json records those differences.
2. Canvas: every (rows x cols) grid with rows * cols <= max_tiles, in transformers' list order. Pick the smallest
   scale >= 1 that fits the image into a canvas without distortion, else the largest scale < 1; among canvases with
   that scale the smallest area (first one). Scales are float32, as in the reference (int64 tensor / int).
3. Resize keeping the aspect ratio into the canvas, upscaling no side beyond max(side, tile_size); bilinear with
   antialias on the uint8 image, the way torchvision 0.29 does it on CPU: natively in uint8 where torch has
   AVX2/AVX512 kernels or on ARM, else through float32 and rounding (`_resize`; the two differ by 1 in some pixels).
4. Pad bottom/right with 0, then rescale and normalise IN BFLOAT16 (`x.to(bf16) * (1/255)`, then (x - 0.5) / 0.5),
   which the reference does on purpose "as in the original implementation"; padding becomes -1.
5. Split into tiles row-major; when there is more than one tile, append a global thumbnail: the original image
   resized straight to tile x tile (aspect ratio not preserved), normalised the same way.

Untrusted input: every bad image raises `ImageError` (a ValueError) naming the problem. The pixel count is checked
from the header before anything is decoded (`MAX_PIXELS`), truncated files are never accepted half-decoded (Pillow's
LOAD_TRUNCATED_IMAGES is forced off while decoding) and remote URLs are not fetched.

Shapes: N tiles, C = 3 channels, H x W pixels, T = tile_size.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import platform
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps

TILE_SIZE = 336  # vision_config.image_size of Scout / Maverick
MAX_TILES = 16  # preprocessor_config max_patches
TOKENS_PER_TILE = 144  # (336 / 14)^2 patches * pixel_shuffle_ratio 0.5^2
MAX_PIXELS = 128_000_000  # refuse larger images before decoding them (decompression bombs)

ImageSource = Image.Image | bytes | bytearray | memoryview | str | Path


class ImageError(ValueError):
    """An image that cannot be used: unreadable, broken, truncated, empty, or too large."""


@dataclass
class ImageBatch:
    """Tiles of a batch of images, in prompt order: each image's tiles row-major, then its thumbnail if any."""

    pixel_values: torch.Tensor  # (N, C, T, T), bfloat16 unless asked otherwise
    grids: list[tuple[int, int]]  # (rows, cols) per image; transformers' `aspect_ratios`
    tiles_per_image: list[int]  # rows * cols, plus 1 for the thumbnail when rows * cols > 1


# ---------------------------------------------------------------------------------------------------------- loading
def load_image(src: ImageSource) -> Image.Image:
    """An upright RGB PIL image from a PIL image, encoded bytes, a file path or a `data:image/...;base64,` URL."""
    if isinstance(src, Image.Image):
        with _pillow_errors("PIL image"):
            return _upright_rgb(src, "PIL image")
    if isinstance(src, bytes | bytearray | memoryview):
        return _decode(bytes(src), f"image bytes ({len(src)} bytes)")
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(_data_url_bytes(src), "data URL")
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        raise ImageError(f"remote image {src[:80]!r}: herd does not fetch URLs; download it and pass the bytes")
    if isinstance(src, str | Path):
        return _decode(*_read_file(src))
    raise ImageError(f"unsupported image source of type {type(src).__name__}: pass PIL, bytes, a path or a data URL")


def image_size(src: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of an encoded image (bytes, a file path or a data URL) from its header alone, without decoding
    a pixel: what a server budgets before it lets `load_image` allocate the pixels. Same errors as `load_image`."""
    if isinstance(src, str) and src.startswith("data:"):
        data, what = _data_url_bytes(src), "data URL"
    elif isinstance(src, str | Path):
        data, what = _read_file(src)
    else:
        data, what = bytes(src), "image bytes"
    if not data:
        raise ImageError(f"{what}: empty, no image data")
    with _pillow_errors(what), Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
        _check_size(img.size, what)
        return img.size


def _read_file(path: str | Path) -> tuple[bytes, str]:
    """(the bytes of an image file, how to name it in an error)."""
    what = f"image file {str(path)!r}"
    if not Path(path).is_file():
        raise ImageError(f"{what} does not exist (or is not a file)")
    try:
        return Path(path).read_bytes(), what
    except OSError as e:
        raise ImageError(f"{what} cannot be read ({e})") from e


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError(f"bad data URL {url[:40]!r}: expected 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"bad data URL {url[:40]!r}: invalid base64 ({e})") from e


def _decode(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ImageError(f"{what}: empty, no image data")
    with _pillow_errors(what), Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
        return _upright_rgb(img, what)


def _upright_rgb(img: Image.Image, what: str) -> Image.Image:
    _check_size(img.size, what)  # before decoding any pixel
    img.load()  # the first frame of an animated GIF / WebP
    return _to_rgb(ImageOps.exif_transpose(img))


@contextlib.contextmanager
def _pillow_errors(what: str) -> Iterator[None]:
    """Decode strictly and turn Pillow's failures into ImageError. Truncated data is never accepted, whatever another
    library set globally; herd's MAX_PIXELS replaces Pillow's bomb warning, and Pillow's DecompressionBombError (above
    twice its own limit, checked inside Image.open) is reported as such."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: refused as a decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{what}: not a readable image (unknown format or corrupt header)") from e
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageError(f"{what}: broken or truncated image data ({type(e).__name__}: {e})") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_size(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what}: zero-sized image ({w}x{h} pixels)")
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{what}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over herd's limit of "
            f"{MAX_PIXELS / 1e6:.0f} (a decompression bomb?)"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL input: composite any transparency onto white, else plain convert."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------- geometry
def _f32(x: float) -> float:
    """Round to float32. transformers divides int64 tensors by ints, i.e. float32 arithmetic; a float64 quotient or
    product of such small numbers rounded once more to float32 is the correctly rounded float32 result."""
    return struct.unpack("f", struct.pack("f", x))[0]


@lru_cache(maxsize=16)
def candidate_canvases(tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> tuple[tuple[int, int], ...]:
    """(height, width) in pixels of every grid with at most max_tiles tiles, in transformers' order: tile counts
    max_tiles..1, rows ascending, grouped by first appearance of each rows/cols ratio."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in (r for r in range(1, count + 1) if count % r == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows * tile_size, count // rows * tile_size))
    return tuple(canvas for group in by_ratio.values() for canvas in group)


def best_canvas(h: int, w: int, tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """(height, width) of the canvas an H x W image is fitted into (transformers' `get_best_fit`)."""
    canvases = candidate_canvases(tile_size, max_tiles)
    scales = [min(_f32(ch / h), _f32(cw / w)) for ch, cw in canvases]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    fits = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])  # first of the smallest area


def resized_size(h: int, w: int, canvas: tuple[int, int], tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(height, width) the image is resized to inside `canvas`: aspect ratio kept, no side upscaled beyond
    max(side, tile_size) (transformers' upscale cap, then `get_max_res_without_distortion`)."""
    ch, cw = canvas
    # Where the canvas side caps the target, transformers holds it as a 0-d int64 tensor: float32 from there on.
    th, h32 = min(max(h, tile_size), ch), max(h, tile_size) > ch
    tw, w32 = min(max(w, tile_size), cw), max(w, tile_size) > cw
    scale_h = _f32(th / h) if h32 else th / h
    scale_w = _f32(tw / w) if w32 else tw / w
    by_width = _f32(scale_w) < _f32(scale_h) if h32 or w32 else scale_w < scale_h
    if by_width:
        new_h, new_w = min(math.floor(_f32(h * scale_w) if w32 else h * scale_w), th), tw
    else:
        new_h, new_w = th, min(math.floor(_f32(w * scale_h) if h32 else w * scale_h), tw)
    return max(new_h, 1), max(new_w, 1)


def tile_tokens(tile_size: int = TILE_SIZE, patch_size: int = 14, pixel_shuffle_ratio: float = 0.5) -> int:
    """Vision tokens per tile after pixel shuffle: (tile / patch)^2 * ratio^2 (144 for Scout / Maverick)."""
    return round((tile_size // patch_size) ** 2 * pixel_shuffle_ratio**2)


def image_token_count(grid: tuple[int, int], tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Prompt tokens an image expands to (transformers' `Llama4Processor._prompt_split_image`): 1x1 is
    <|image_start|> <|image|> patches <|image_end|>; larger grids add a separator per tile (x within a row, y after
    each row) and the thumbnail's patches."""
    rows, cols = grid
    if rows * cols == 1:
        return tokens_per_tile + 3
    return (tokens_per_tile + 1) * rows * cols + tokens_per_tile + 3  # 145 * rows * cols + 147 for 336-px tiles


# ---------------------------------------------------------------------------------------------------------- pixels
def _native_uint8_resize() -> bool:
    """torchvision 0.29 resizes uint8 images natively on CPUs torch reports as AVX2 / AVX512 and on ARM, and through
    float32 + round elsewhere; the two differ by one level in some pixels, so herd takes the same branch."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's bilinear antialiased resize of a uint8 (C, H, W) image (transforms.v2 `resize_image`)."""
    if tuple(x.shape[-2:]) == size:
        return x  # torchvision returns the input untouched
    if _native_uint8_resize():
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    y = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return y.round_().to(torch.uint8)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] in bfloat16, op for op as the reference (a bf16 product with the float scalar 1/255, then
    torchvision's normalize with bf16 mean and std)."""
    half = torch.full((3, 1, 1), 0.5, dtype=torch.bfloat16)
    return (x.to(torch.bfloat16) * (1 / 255)).sub(half).div_(half)


def _tiles(x: torch.Tensor, tile_size: int, max_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(tiles incl. thumbnail, grid) for one uint8 (C, H, W) image."""
    h, w = x.shape[-2:]
    ch, cw = best_canvas(h, w, tile_size, max_tiles)
    new_h, new_w = resized_size(h, w, (ch, cw), tile_size)
    canvas = F.pad(_resize(x, (new_h, new_w)), (0, cw - new_w, 0, ch - new_h))  # (C, ch, cw), zeros bottom/right
    rows, cols = ch // tile_size, cw // tile_size
    tiles = _normalize(canvas).view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)  # (N, C, T, T), row-major
    if rows * cols > 1:
        thumbnail = _normalize(_resize(x, (tile_size, tile_size)))  # (C, T, T)
        tiles = torch.cat([tiles, thumbnail[None]])
    return tiles, (rows, cols)


def preprocess(
    images: ImageSource | Sequence[ImageSource],
    tile_size: int = TILE_SIZE,
    max_tiles: int = MAX_TILES,
    dtype: torch.dtype = torch.bfloat16,
) -> ImageBatch:
    """Tiles for one image or a list of them (anything `load_image` accepts); tile_size / max_tiles come from the
    vision config (image_size) and the processor config (max_patches)."""
    if tile_size < 1 or max_tiles < 1:
        raise ValueError(f"tile_size and max_tiles must be positive, got {tile_size} and {max_tiles}")
    if isinstance(images, ImageSource):
        images = [images]
    all_tiles, grids = [], []
    for src in images:
        rgb = np.array(load_image(src))  # (H, W, C) uint8
        tiles, grid = _tiles(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), tile_size, max_tiles)
        all_tiles.append(tiles)
        grids.append(grid)
    pixel_values = torch.cat(all_tiles) if all_tiles else torch.empty(0, 3, tile_size, tile_size, dtype=torch.bfloat16)
    return ImageBatch(pixel_values.to(dtype), grids, [t.shape[0] for t in all_tiles])
