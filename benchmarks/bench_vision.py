"""herd vs Hugging Face transformers on the image path (CPU): preprocessing, vision tower + projector, end to end.

What it measures, for the tiny config (28-px tiles, up to 6 tiles per image) and a mid-size one (336-px tiles of
14-px patches, up to 16 tiles, width 256, 6 layers), float32, one warm-up then the median of at least `--repeats`
runs (more for fast steps, to fill `--min-seconds`):
- preprocessing images/s: decode + EXIF orientation + tile + normalise of the whole image set (the committed test
  images in tests/data/images, 10 files from 20x12 to 1080x1920) in one call. herd: `herd.image.preprocess` on the
  file paths; transformers: Pillow open + `ImageOps.exif_transpose` + `Llama4ImageProcessor`, run in a subprocess of
  the reference venv (.refvenv, see scripts/make_image_fixtures.py) because it needs torchvision. Both give bf16 tiles,
  which are compared ("pixels identical");
- vision tower + projector tiles/s and images/s, all tiles of the set in one call, the two sides taking turns
  (the machine's slow phases then hit both): herd's `model.image_features` vs transformers'
  `multi_modal_projector(vision_model(x).last_hidden_state)` (sdpa attention) on the same pixel values (herd's tiles in
  float32) and the same weights (herd's random weights, saved and loaded by transformers); max |diff| is reported;
- end to end images/s = images / (preprocessing time + tower time), with the herd / transformers ratio.
Without .refvenv the transformers preprocessing and end-to-end columns read n/a.

Run:  .venv/bin/python benchmarks/bench_vision.py            (full size, a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_vision.py --quick    (one-layer narrow towers, few repeats: under a minute)
Writes a markdown table to stdout and JSON to benchmarks/results/bench_vision.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
REF_PYTHON = ROOT / ".refvenv" / "bin" / "python"

# Runs in the reference venv: argv[1] holds the settings; prints its versions, then preprocesses the whole image set
# once per line read from stdin (answering with a line); at EOF it saves the last pixel values for the comparison.
CHILD = r"""
import json, sys
import torch, torchvision, transformers
from PIL import Image, ImageOps
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
proc = Llama4ImageProcessor(size={"height": a["tile"], "width": a["tile"]}, max_patches=a["max_tiles"])
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                  "transformers": transformers.__version__}), flush=True)

def upright(path):
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)

for _ in sys.stdin:
    out = proc(images=[upright(p) for p in a["paths"]], return_tensors="pt")
    print("done", flush=True)
torch.save(out["pixel_values"], a["pixels_out"])
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="narrow one-layer towers, few repeats: a smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side at least (after one warm-up)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="more calls for fast steps, to fill this time")
    p.add_argument("--images", type=Path, default=IMAGES, help="folder of images, all files used, sorted by name")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_vision.json")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.min_seconds = 1, 0.5
    return a


def configs(quick: bool) -> dict:
    import herd

    width, layers = (64, 1) if quick else (256, 6)
    mid = herd.VisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=4 * width, image_size=336, patch_size=14, projector_input_dim=512,
                            projector_output_dim=512, vision_output_dim=512, max_tiles=16)
    tiny = herd.multimodal_preset("tiny")
    if quick:
        tiny.vision_config = herd.VisionConfig(**{**herd.config.VISION_PRESETS["tiny"], "num_hidden_layers": 1})
    mid_cfg = herd.Llama4Config(text_config=herd.preset("tiny"), vision_config=mid, **herd.config.TINY_IMAGE_TOKENS)
    return {"tiny": tiny, "mid": mid_cfg}


def median_times(fns: dict, repeats: int, min_seconds: float) -> tuple[dict, dict]:
    """Median seconds of each function after one warm-up round, the functions taking turns, over `repeats` rounds or
    more for fast functions (enough rounds to fill `min_seconds`, at most 200); and each one's last result."""
    times: dict = {k: [] for k in fns}
    out, rounds, r = {}, 1, 0
    while r <= rounds:
        t_round = time.perf_counter()
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
        if r == 0:  # the warm-up round sets the count
            rounds = max(repeats, min(200, math.ceil(min_seconds / (time.perf_counter() - t_round))))
        r += 1
    return {k: statistics.median(v[1:]) for k, v in times.items()}, out


def ref_worker(a, paths: list[str], tile: int, max_tiles: int, pixels_out: str):
    """The reference preprocessor in its own process: (process, versions, a function that runs it once)."""
    settings = dict(paths=paths, tile=tile, max_tiles=max_tiles, threads=a.threads, pixels_out=pixels_out)
    proc = subprocess.Popen([str(REF_PYTHON), "-c", CHILD, json.dumps(settings)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    versions = json.loads(proc.stdout.readline())

    def run() -> None:
        proc.stdin.write("run\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done", "reference preprocessing failed"

    return proc, versions, run


def bench_config(a, name: str, cfg, paths: list[str]) -> dict:
    from transformers import Llama4ForConditionalGeneration

    import herd
    import herd.image

    v, n_img = cfg.vision_config, len(paths)
    res: dict = {"images": n_img, "vision_config": {k: getattr(v, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "max_tiles")}}
    fns = {"herd": lambda: herd.image.preprocess(paths, tile_size=v.image_size, max_tiles=v.max_tiles)}
    with tempfile.TemporaryDirectory() as tmp:
        pixels_file = os.path.join(tmp, "pixels.pt")
        if REF_PYTHON.exists():
            worker, res["ref_versions"], fns["ref"] = ref_worker(a, paths, v.image_size, v.max_tiles, pixels_file)
        else:
            log(f"{name}: no {REF_PYTHON.relative_to(ROOT)}: transformers preprocessing skipped")
        t, out = median_times(fns, a.repeats, a.min_seconds)
        batch = out["herd"]
        res["tiles"], res["herd_preprocess_s"] = int(batch.pixel_values.shape[0]), t["herd"]
        msg = f"{name}: preprocess images/s: herd {n_img / t['herd']:8.1f} ({t['herd']:.3f} s, {res['tiles']} tiles)"
        if "ref" in t:
            worker.stdin.close()
            assert worker.wait() == 0, "reference preprocessing failed"
            ref_pixels = torch.load(pixels_file)
            same = ref_pixels.shape == batch.pixel_values.shape and bool(torch.equal(ref_pixels, batch.pixel_values))
            res["pixels_identical"], res["ref_preprocess_s"] = same, t["ref"]
            msg += f", transformers {n_img / t['ref']:8.1f} ({t['ref']:.3f} s), pixels identical: {same}"
        log(msg)
        model = herd.build_model(cfg, seed=0).eval()
        herd.save_pretrained(model, tmp)
        hf = Llama4ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    pixels = batch.pixel_values.float()  # (N, 3, S, S)
    with torch.no_grad():
        t, out = median_times({"herd": lambda: model.image_features(pixels), "ref": lambda: hf.multi_modal_projector(
            hf.vision_model(pixels).last_hidden_state)}, a.repeats, a.min_seconds)
    res["herd_tower_s"], res["ref_tower_s"] = t["herd"], t["ref"]
    log(f"{name}: tower+projector tiles/s: herd {res['tiles'] / t['herd']:8.1f} ({t['herd']:.3f} s), "
        f"transformers {res['tiles'] / t['ref']:8.1f} ({t['ref']:.3f} s)")
    res["max_abs_diff"] = (out["herd"] - out["ref"].reshape(out["herd"].shape)).abs().max().item()
    res["tokens_per_tile"], res["params_vision"] = v.tokens_per_tile, sum(
        p.numel() for m in (model.vision_model, model.multi_modal_projector) for p in m.parameters())
    return res


def rates(r: dict) -> dict:
    """images/s or tiles/s per metric and side; None where the reference preprocessing did not run."""
    n, tiles = r["images"], r["tiles"]
    pre = r.get("ref_preprocess_s")
    return {
        "preprocess images/s": (n / r["herd_preprocess_s"], n / pre if pre else None),
        "tower + projector tiles/s": (tiles / r["herd_tower_s"], tiles / r["ref_tower_s"]),
        "tower + projector images/s": (n / r["herd_tower_s"], n / r["ref_tower_s"]),
        "end to end images/s": (n / (r["herd_preprocess_s"] + r["herd_tower_s"]),
                                n / (pre + r["ref_tower_s"]) if pre else None),
    }


def table(res: dict) -> str:
    rows = ["| config | metric | herd | transformers | herd / transformers |", "|---|---|---:|---:|---:|"]
    notes = []
    for name, r in res.items():
        v = r["vision_config"]
        label = f"{name} ({v['image_size']} px, <= {v['max_tiles']} tiles, {v['num_hidden_layers']}x{v['hidden_size']})"
        for metric, (x, y) in rates(r).items():
            ys, ratio = (f"{y:,.1f}", f"{x / y:.2f}x") if y else ("n/a", "n/a")
            rows.append(f"| {label} | {metric} | {x:,.1f} | {ys} | {ratio} |")
        same = {True: "identical", False: "DIFFERENT", None: "not compared"}[r.get("pixels_identical")]
        notes.append(f"{name}: {r['images']} images -> {r['tiles']} tiles of {r['tokens_per_tile']} tokens, "
                     f"{r['params_vision'] / 1e6:.2f}M vision params; tower max |diff| {r['max_abs_diff']:.2e}; "
                     f"preprocessed pixels {same}")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def machine_info(a) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "transformers": transformers.__version__}


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    info = machine_info(a)
    paths = sorted(str(p) for p in a.images.iterdir() if p.is_file())
    log(f"machine: {info['cpu']} x{info['cpu_count']}, torch {info['torch']}, transformers {info['transformers']}; "
        f"{len(paths)} images from {a.images}")
    res = {name: bench_config(a, name, cfg, paths) for name, cfg in configs(a.quick).items()}
    info["reference"] = next((r["ref_versions"] for r in res.values() if "ref_versions" in r), None)
    md = table(res)
    ref = info["reference"]
    ref = f"torch {ref['torch']}, torchvision {ref['torchvision']}" if ref else "n/a (no reference venv)"
    print(f"\nherd vs transformers {info['transformers']}, float32, {a.threads} threads, {info['cpu']}; "
          f"reference preprocessing: {ref}\n\n{md}")
    for r in res.values():
        r["rates"] = {k: {"herd": x, "transformers": y} for k, (x, y) in rates(r).items()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "out"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": info, "settings": settings, "image_files": [Path(p).name for p in paths],
                                 "results": res, "table": md}, indent=2))
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
