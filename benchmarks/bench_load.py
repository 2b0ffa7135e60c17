"""Checkpoint loading: peak memory and time of herd.from_pretrained vs transformers' from_pretrained.

herd builds the model on the meta device, allocates it once at the target dtype and streams tensors out of the
memory-mapped safetensors files, so peak memory should stay near one copy of the weights. Each loader runs in its
own fresh process and reports its peak resident set (VmHWM) minus its resident set just before loading.
Run: .venv/bin/python benchmarks/bench_load.py [--quick]   (writes benchmarks/results/bench_load.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "herd":
    import herd
    load = lambda: herd.from_pretrained(path, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.Llama4ForCausalLM.from_pretrained(path, dtype=dtype)
def status(key):  # kB values from /proc: VmRSS = resident now, VmHWM = peak resident so far
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
base = status("VmRSS")
t0 = time.perf_counter()
model = load()
dt = time.perf_counter() - t0
peak = status("VmHWM")
n = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": dt, "peak_delta_bytes": (peak - base) * 1024, "model_bytes": n}))
"""


def run_child(which: str, path: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path, dtype], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{which} loader failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    import herd
    import herd.sizes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small checkpoint, seconds instead of a minute")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype to load into")
    ap.add_argument("--out", default="benchmarks/results/bench_load.json")
    args = ap.parse_args()
    width, layers = (256, 4) if args.quick else (1024, 8)
    cfg = herd.TextConfig(vocab_size=32000, hidden_size=width, num_hidden_layers=layers, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=width // 8, intermediate_size=int(1.5 * width),
                          intermediate_size_mlp=3 * width, num_local_experts=8, bos_token_id=1, eos_token_id=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[bench_load] writing a {herd.sizes.human(herd.count_params(cfg).total)}-parameter float32 "
              f"checkpoint (sharded at 256 MiB) ...", flush=True)
        model = herd.build_model(cfg, seed=0)
        herd.save_pretrained(model, tmp, max_shard_bytes=256 * 2**20)
        del model
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        for which in ("herd", "transformers"):
            print(f"[bench_load] loading with {which} into {args.dtype} ...", flush=True)
            r = run_child(which, tmp, args.dtype)
            rows.append({"loader": which, **r, "checkpoint_bytes": size})
    h, t = rows
    print("\n| loader | load s | peak RSS growth | model bytes | peak / model |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['loader']} | {r['seconds']:.2f} | {r['peak_delta_bytes'] / 2**20:.0f} MiB | "
              f"{r['model_bytes'] / 2**20:.0f} MiB | {r['peak_delta_bytes'] / r['model_bytes']:.2f} |")
    print(f"\ncheckpoint on disk: {size / 2**20:.0f} MiB (float32); herd/transformers: time "
          f"{h['seconds'] / t['seconds']:.2f}x, peak memory {h['peak_delta_bytes'] / t['peak_delta_bytes']:.2f}x")
    result = {"rows": rows, "dtype": args.dtype, "machine": {"platform": platform.platform(),
              "python": platform.python_version(), "torch": torch.__version__}, "time": time.time()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
