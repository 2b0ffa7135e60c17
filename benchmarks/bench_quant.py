"""Weight-only quantization (herd.infer.quant) on a trained checkpoint: memory, perplexity, bits per byte, decode speed.

For each format - the float model (the reference), int8 per channel, int4 in groups (every group size of 32 / 64 /
128 that divides all the decoder's input widths), fp8 e4m3 weights per channel, and fp8 dynamic (the same weights,
inputs rounded to fp8 per row too, multiplied by torch._scaled_mm: W8A8) - the checkpoint is loaded afresh, its text
decoder quantized (router, lm_head, embeddings and vision tower stay float), and measured:
- bytes: the whole model (vision tower included when there is one) and the converted modules alone;
- perplexity and bits per byte on fixed batches of the built-in validation text, packed exactly as the trainer packs
  its validation set (herd.train.inputs.documents + Packer, same seq_len / batch / seed defaults as `herd train`'s
  tiny runs), so the float32 row reproduces the run's logged val_loss / val_bpb; delta vs float32;
- top-1 agreement: the share of validation positions whose argmax equals the float32 model's;
- greedy decode tokens/s at batch 1 (herd.generate, `--new-tokens` after a `--prompt-len` prompt of validation
  text; timed from the first new token to the last, best of `--repeats`), and how many of the greedy tokens equal
  the float32 model's before the first difference;
- eval tokens/s: the batched forward of the perplexity pass (dequantization amortized over batch x seq_len rows).
A second, small table times one `--layer-dim` square linear at each of `--layer-batches` rows, float vs quantized,
where the weight is large enough for the dequantize to show. On a GPU with fp8 tensor cores (`--device cuda --dtype
bfloat16`) this is where fp8 dynamic's speed shows: half the weight bytes of bfloat16 at batch 1, twice the matmul
rate at large batches.

The model: `--model DIR` (a Hugging Face checkpoint directory), by default runs/tiny-10min/hf when it exists (the
tiny multimodal model `make demo` trains in 10 minutes); without one, a random-init tiny model, which the output says:
its perplexity is near the vocabulary size and says nothing about quantization quality.

Run:  .venv/bin/python benchmarks/bench_quant.py [--model DIR] [--threads 1]
      python benchmarks/bench_quant.py --device cuda --dtype bfloat16 --layer-dim 8192 --layer-batches 1,16,256,4096
Writes a markdown table to stdout and JSON to benchmarks/results/bench_quant.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import herd
from herd.data.packing import IGNORE, Packer
from herd.infer.quant import QuantLinear, model_bytes, quantize
from herd.tokenizer import Tokenizer, tiny_tokenizer
from herd.train.inputs import documents, token_bytes_table
from herd.train.train_config import TrainConfig

DEFAULT_MODEL = Path("runs/tiny-10min/hf")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="Hugging Face checkpoint dir (default: runs/tiny-10min/hf, if any)")
    ap.add_argument("--seq-len", type=int, default=64, help="validation row length (the tiny runs train at 64)")
    ap.add_argument("--batch-size", type=int, default=16, help="validation rows per batch")
    ap.add_argument("--batches", type=int, default=8, help="validation batches (the trainer's eval_batches)")
    ap.add_argument("--seed", type=int, default=0, help="packing seed of the validation stream")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens for the decode timing")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per decode timing")
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per format (best is reported)")
    ap.add_argument("--layer-dim", type=int, default=2048, help="width of the single-layer timing (0: skip it)")
    ap.add_argument("--layer-batches", default="1", help="rows of the single-layer timing, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/bench_quant.json")
    return ap.parse_args(argv)


def load(path: Path | None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The float model (a training run's export loads with whatever router biases it carries, as herd serves it)."""
    if path is None:
        return herd.build_model(herd.preset("tiny"), seed=0, dtype=dtype, device=device).eval()
    return herd.from_pretrained(path, dtype=dtype, device=device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def text_part(model):
    return model.decoder


def input_widths(model) -> set[int]:
    text = text_part(model)
    widths = {m.in_features for n, m in text.model.layers.named_modules() if type(m) is nn.Linear}
    cfg = text.config
    return widths | {cfg.hidden_size, cfg.intermediate_size}  # the experts' gate_up and down inputs


@torch.no_grad()
def evaluate(model, batches: list[dict], bytes_table: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Mean loss over every target and bits per byte over text targets, as herd's trainer computes them; and the
    model's top-1 prediction at every position."""
    sums = torch.zeros(4, dtype=torch.float64)  # nats, targets, text nats, text bytes
    top1 = []
    t0 = time.perf_counter()
    dev = model.device
    for b in batches:
        logits = model(b["input_ids"].to(dev), doc_ids=b["doc_ids"].to(dev))  # (B, T, V)
        top1.append(logits.argmax(-1).cpu())
        labels = b["labels"].flatten().to(dev)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE, reduction="none")
        nbytes = bytes_table[labels.clamp(min=0)] * (labels != IGNORE)
        sums += torch.stack([nll.sum(), (labels != IGNORE).sum(), nll[nbytes > 0].sum(), nbytes.sum()]).double().cpu()
    dt = time.perf_counter() - t0
    nats, n, text_nats, nbytes = sums.tolist()
    tokens = sum(b["input_ids"].numel() for b in batches)
    return {"loss": nats / n, "ppl": math.exp(nats / n), "bpb": text_nats / (math.log(2) * nbytes),
            "eval_tok_s": tokens / dt}, torch.cat(top1)


def decode(model, prompt: torch.Tensor, n: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best decode tokens/s over `repeats` greedy runs, and the generated ids. No EOS: all n steps run."""
    best, out = 0.0, None
    for _ in range(repeats):
        stamps: list[float] = []

        def stamp(_ids, s=stamps):
            sync(model.device)  # a GPU step is only done when its kernels are
            s.append(time.perf_counter())
        out = herd.generate(model, prompt, n, on_token=stamp)
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))  # the first token comes with the prompt
    return best, out[0, prompt.shape[1]:].cpu()


def same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    diff = (a != b).nonzero()
    return int(diff[0]) if len(diff) else len(a)


@torch.no_grad()
def layer_timing(dim: int, formats: list[tuple], batches: list[int], dtype: torch.dtype, device: str,
                 repeats: int = 20) -> list[dict]:
    """Best time of y = layer(x) for x (M, dim), M in `batches`: nn.Linear vs QuantLinear. The best of `repeats`
    timings (5 on a GPU), each the mean of `calls` back-to-back calls (one on CPU; 10 on a GPU, to hide the launch
    gaps), not the median: on a shared machine the slow calls measure the neighbours."""
    lin = nn.Linear(dim, dim, bias=False, dtype=dtype, device=device)
    gpu = torch.device(device).type == "cuda"
    calls, repeats = (10, min(repeats, 5)) if gpu else (1, repeats)
    rows = []
    for name, bits, g, act in formats:
        layer = lin if bits is None else QuantLinear(lin, bits, g, act)
        for m in batches:
            x = torch.randn(m, dim, dtype=dtype, device=device)
            layer(x)
            times = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                sync(device)
                times.append((time.perf_counter() - t0) / calls)
            ms = min(times) * 1e3
            rows.append({"format": name, "rows": m, "bytes": model_bytes(layer), "ms": ms,
                         "tflops": 2 * m * dim * dim / (ms / 1e3) / 1e12})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = Path(args.model) if args.model else (DEFAULT_MODEL if DEFAULT_MODEL.is_dir() else None)
    label = str(path) if path else "random-init tiny (no trained checkpoint found; perplexities are meaningless)"
    if path is None:
        log(f"WARNING: {DEFAULT_MODEL} not found and no --model given: using a random-init tiny model")
    log(f"model: {label}; {args.threads} thread(s), {args.device}, {args.dtype}")

    ref = load(path, dtype, args.device)
    has_tok = path is not None and (path / "tokenizer.json").exists()
    tok = Tokenizer.from_pretrained(path) if has_tok else tiny_tokenizer()
    V = text_part(ref).config.vocab_size
    bytes_table = token_bytes_table(tok, V).to(args.device)
    tcfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    val = iter(Packer(documents(tcfg, "val"), tok, args.seq_len, args.batch_size, seed=args.seed))
    batches = [next(val) for _ in range(args.batches)]
    prompt = batches[0]["input_ids"][:1, :args.prompt_len]

    widths = input_widths(ref)
    groups = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)][:2]
    formats = [(args.dtype, None, None, None), ("int8", 8, None, "float"),
               *[(f"int4 g{g}", 4, g, "float") for g in groups], ("fp8", "fp8", None, "float"),
               ("fp8 dynamic", "fp8", None, "fp8")]
    rows, ref_tokens, ref_top1 = [], None, None
    for name, bits, g, act in formats:
        model = ref if bits is None else load(path, dtype, args.device)
        summary = quantize(model, bits, g, activations=act) if bits is not None else None
        ev, top1 = evaluate(model, batches, bytes_table)
        tok_s, tokens = decode(model, prompt, args.new_tokens, args.repeats)
        ref_tokens = tokens if ref_tokens is None else ref_tokens
        ref_top1 = top1 if ref_top1 is None else ref_top1
        rows.append({"format": name, "bits": bits, "group_size": g, "activations": act,
                     "model_bytes": model_bytes(model),
                     "text_bytes": model_bytes(text_part(model)),
                     "converted": len(summary.converted) if summary else 0,
                     "converted_ratio": summary.ratio if summary else 1.0, **ev,
                     "top1_agreement": float((top1 == ref_top1).float().mean()), "decode_tok_s": tok_s,
                     "same_greedy_tokens": same_prefix(tokens, ref_tokens)})
        log(f"{name}: ppl {ev['ppl']:.3f}, bpb {ev['bpb']:.4f}, decode {tok_s:.1f} tok/s")
    base = rows[0]
    for r in rows:
        r["d_ppl"], r["d_bpb"] = r["ppl"] - base["ppl"], r["bpb"] - base["bpb"]

    machine = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else \
        f"{args.threads} CPU thread(s)"
    layer_batches = [int(m) for m in args.layer_batches.split(",")]
    layers = layer_timing(args.layer_dim, formats, layer_batches, dtype, args.device) if args.layer_dim else []
    print(f"\nModel: {label}. {args.batches} x {args.batch_size} x {args.seq_len} validation tokens; "
          f"decode: batch 1, {args.prompt_len}-token prompt, {args.new_tokens} greedy tokens; "
          f"{machine}, {args.dtype}, torch {torch.__version__}.\n")
    print("| format | model MB | text MB | converted x smaller | perplexity | d ppl | bits/byte | d bpb "
          "| top-1 = float32 | decode tok/s | eval tok/s | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['model_bytes'] / 1e6:.3f} | {r['text_bytes'] / 1e6:.3f} | "
              f"{r['converted_ratio']:.2f} | {r['ppl']:.3f} | {r['d_ppl']:+.3f} | {r['bpb']:.4f} | "
              f"{r['d_bpb']:+.4f} | {r['top1_agreement']:.3f} | {r['decode_tok_s']:.1f} | {r['eval_tok_s']:.0f} | "
              f"{r['same_greedy_tokens']}/{args.new_tokens} |")
    if layers:
        print(f"\nOne {args.layer_dim}x{args.layer_dim} linear, {args.dtype} activations (best of 20 timings):\n")
        print("| format | weight MB | rows | ms / call | TFLOP/s | vs float |")
        print("|---|---|---|---|---|---|")
        base = {r["rows"]: r["ms"] for r in layers if r["format"] == args.dtype}
        for r in layers:
            print(f"| {r['format']} | {r['bytes'] / 1e6:.2f} | {r['rows']} | {r['ms']:.3f} | {r['tflops']:.2f} | "
                  f"{base[r['rows']] / r['ms']:.2f}x |")
    result = {"model": label, "rows": rows, "layer": {"dim": args.layer_dim, "rows": layers}, "args": vars(args),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": machine,
                          "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
              "time": time.time()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
