"""fp8 matmuls on a GPU: where the time of herd's fp8 dynamic linear goes, against bfloat16, from decode to prefill.

For y = x @ W.T, x (M, K) bfloat16, W (N, K), each variant is timed with CUDA events (median of `--repeats` timings
of `--calls` back-to-back calls, after a warm-up):
- bf16: F.linear on the bfloat16 weight (the reference);
- herd fp8 dynamic: `herd.infer.quant.fp8_linear`, what `quantize(model, "fp8", activations="fp8")` runs: the
  input rows quantized to e4m3 on the fly, then one row-wise `torch._scaled_mm`;
- its two parts alone: the row quantization (eager, and under torch.compile, which fuses its element-wise passes)
  and the row-wise `_scaled_mm` on already-quantized operands (with and without `use_fast_accum`);
- tensor-wise `_scaled_mm` (one scale per operand, the cuBLASLt path), the kernel a per-tensor activation scale
  would use, for comparison.
TFLOP/s counts 2 M K N per call; GB/s counts the weight bytes read once per call.

Run:  python benchmarks/bench_fp8_matmul.py [--shapes 8192x8192,5120x16384] [--rows 1,16,256,4096]
Writes a markdown table and JSON to benchmarks/results/bench_fp8_matmul.json (or --out). Needs a CUDA GPU with fp8
tensor cores (compute capability 8.9 or newer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.infer.quant import fp8_linear, quantize_rows_fp8, quantize_weight


def timed(fn, calls: int, repeats: int) -> float:
    """Median milliseconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def variants(x, w, codes, scale, compiled) -> dict:
    """The timed calls for one input x (M, K) and weight w (N, K) with its fp8 codes and per-row scales."""
    xq, sx = quantize_rows_fp8(x)
    one = torch.ones((), device=x.device)

    def scaled(a_scale, b_scale, fast):
        return lambda: torch._scaled_mm(xq, codes.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
    return {
        "bf16": lambda: F.linear(x, w),
        "herd fp8 dynamic": lambda: fp8_linear(x, codes, scale),
        "row quantization": lambda: quantize_rows_fp8(x),
        "row quantization, compiled": lambda: compiled(x),
        "row-wise mm": scaled(sx, scale.t(), False),
        "row-wise mm, fast accum": scaled(sx, scale.t(), True),
        "tensor-wise mm": scaled(one, one, False),
        "tensor-wise mm, fast accum": scaled(one, one, True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8192x8192,5120x16384", help="KxN weights, comma-separated")
    ap.add_argument("--rows", default="1,16,256,4096", help="M values, comma-separated")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/bench_fp8_matmul.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+)", file=sys.stderr)
        return 2
    compiled = torch.compile(quantize_rows_fp8, dynamic=True)
    rows, results = [], []
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        codes, scale = quantize_weight(w, "fp8")  # (N, K) e4m3, (N, 1) float32
        for M in (int(m) for m in a.rows.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            base = None
            for name, fn in variants(x, w, codes, scale, compiled).items():
                try:
                    ms = timed(fn, a.calls, a.repeats)
                except Exception as e:  # noqa: BLE001 - a kernel this torch / GPU lacks; the other variants go on
                    print(f"{shape} M={M} {name}: {str(e).splitlines()[0]}", file=sys.stderr)
                    continue
                base = base or ms
                wbytes = N * K * (2 if name == "bf16" else 1)
                r = {"K": K, "N": N, "M": M, "variant": name, "ms": ms, "tflops": 2 * M * K * N / ms / 1e9,
                     "weight_gb_s": wbytes / ms / 1e6, "vs_bf16": base / ms}
                results.append(r)
                rows.append(f"| {K}x{N} | {M} | {name} | {ms:.4f} | {r['tflops']:.1f} | {r['weight_gb_s']:,.0f} | "
                            f"{r['vs_bf16']:.2f}x |")
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; median of {a.repeats} timings of "
          f"{a.calls} calls.\n")
    print("| K x N | M | variant | ms / call | TFLOP/s | weight GB/s | bf16 time / this |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
