"""`herd export`: write a checkpoint in another engine's format.

  herd export --gguf out.gguf --model DIR [--type f32|f16|q8_0] [--force]   for llama.cpp / Ollama

(herd.formats.gguf_export writes the file.)

A model that llama.cpp would compute differently (herd.formats.gguf_export.llama_cpp_mismatches) is refused with the
list of differences; --force writes it anyway and prints the list as a warning.
"""

from __future__ import annotations

import sys
import warnings


def cmd_export(args) -> int:
    from herd.formats.gguf_export import export_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = export_checkpoint(args.model, args.gguf, type=args.type, force=args.force)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {args.gguf} ({args.type})" + (f" with {len(why)} llama.cpp difference(s), forced" if why else ""))
    return 0


def add_export_parser(sub) -> None:
    from herd.formats.gguf_export import TYPES

    sp = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp / Ollama")
    sp.add_argument("--model", required=True, metavar="DIR", help="herd / Hugging Face checkpoint (or a .gguf file)")
    sp.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    sp.add_argument("--type", choices=TYPES, default="f16", help="weight type (norms and routers stay f32)")
    sp.add_argument("--force", action="store_true",
                    help="export even where llama.cpp computes the model differently (the differences are printed)")
    sp.set_defaults(fn=cmd_export)
