"""The `herd` command: a thin layer that parses arguments and calls the library.

  herd info --preset llama4-scout        sizes, memory at bf16/fp8/int4, KV-cache cost (no weights allocated)
  herd info --model DIR                  the same for a checkpoint directory
  herd init --preset tiny --out DIR      write a randomly initialised checkpoint in the Hugging Face format
  herd generate --model DIR --prompt-ids 1,2,3 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time


def _config(args):
    from herd.checkpoint import load_config
    from herd.config import multimodal_preset

    return load_config(args.model) if args.model else multimodal_preset(args.preset)


def cmd_info(args) -> int:
    from herd.sizes import describe

    cfg = _config(args)
    rows = describe(cfg)
    width = max(len(k) for k, _ in rows)
    print(f"herd info: {args.model or args.preset}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def cmd_init(args) -> int:
    import torch

    from herd.config import multimodal_preset, preset
    from herd.model.build import build_model

    cfg = multimodal_preset(args.preset) if args.multimodal else preset(args.preset)
    model = build_model(cfg, dtype=getattr(torch, args.dtype), seed=args.seed)
    model.save_pretrained(args.out)
    print(f"wrote a random {args.preset} checkpoint to {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from herd.checkpoint import from_pretrained
    from herd.config import preset
    from herd.infer.generate import generate
    from herd.model.build import build_model

    if args.model:
        model = from_pretrained(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    else:
        model = build_model(preset(args.preset), seed=args.seed)
    try:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        print(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
        return 2
    ids = torch.tensor([prompt or [model.config.bos_token_id or 0]])
    t0 = time.perf_counter()
    out = generate(model.eval(), ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(args.seed))
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    print("prompt ids:", ids[0].tolist())
    print("new ids:   ", new)
    print(f"{len(new)} tokens in {dt:.2f}s ({len(new) / dt:.1f} tok/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="herd", description="Llama 4 in PyTorch: model, checkpoints, generation.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def source(sp, default_preset="tiny"):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--preset", default=default_preset, help="named preset (see herd.config.PRESETS)")
        g.add_argument("--model", help="Hugging Face checkpoint directory")

    sp = sub.add_parser("info", help="parameters, memory and KV-cache cost of a preset or checkpoint")
    source(sp)
    sp.set_defaults(fn=cmd_info)
    sp = sub.add_parser("init", help="write a randomly initialised checkpoint (Hugging Face format)")
    sp.add_argument("--preset", default="tiny")
    sp.add_argument("--out", required=True)
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--multimodal", action="store_true", help="with the vision tower (Llama4ForConditionalGeneration)")
    sp.set_defaults(fn=cmd_init)
    sp = sub.add_parser("generate", help="generate token ids (the tokenizer arrives with the multimodal issue)")
    source(sp)
    sp.add_argument("--prompt-ids", default="", help="comma-separated token ids")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_generate)
    args = p.parse_args(argv)
    from herd.checkpoint import CheckpointError
    from herd.config import ConfigError

    try:
        return args.fn(args)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
