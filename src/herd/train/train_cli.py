"""`herd train` and `herd midtrain`: argument parsing over herd.train (the library does the work).

  herd train --preset tiny --out runs/x [--max-steps N] [--config FILE] [key=value ...] [--key=value ...]
  herd train --resume runs/x [--max-steps N]          continue a run from its newest checkpoint, exactly
  herd midtrain --init runs/x --out runs/x-long [--seq-len 256] [--data builtin+passkey+kv] [--max-steps N]
  herd sft --init runs/x --data chats.jsonl|tasks:NAME[,NAME][@D] --out runs/y [prune_easy=0.5] (herd.post.sft)
  herd dpo --init runs/y/hf --pairs pairs.jsonl --out runs/d [beta=0.1] [label_smoothing=0.0]  (herd.post.dpo)
  herd dpo --init runs/z/hf --from-rollouts runs/z/rollouts.jsonl|tasks:NAME --out runs/d [prefer=shorter]
  herd rl --init runs/y/hf --tasks arithmetic@3,sorting --out runs/z [group_size=8] [rl_async=true]  (herd.post.rl)
  herd recipe [--preset demo] --out runs/recipe [--stages base,sft,rl,dpo]   the whole recipe + report card
      (stages: base, contrastive, align, joint, sft, rl, dpo; the three vision stages make the model multimodal)
  herd upcycle --init DIR --experts 8 --out DIR [--every 1|2]   a dense model -> a Llama 4 MoE (herd.train.upcycle)

Settings are applied in order: the preset (or, when resuming, the run's own train_config.json), the --config file
(JSON or TOML), then key=value items (written together, after the options); every TrainConfig field is also
accepted as --key=value / --key value, and `model.FIELD=value` changes the model preset. `--max-steps N` stops
after step N; a fresh run that did not set `steps` also plans its schedule over N steps. Resuming past the planned
`steps` continues at the final LR.

Mid-training continues from a finished (or running) run's newest checkpoint - weights and expert biases, with a
fresh optimizer and schedule - at a longer sequence length, keeping the tokens per step of the run (fewer, longer
rows). The run's own settings carry over except the schedule, which comes from the "tiny-midtrain" preset (short
warmup, lower LR), and the data, to which passkey and key-value retrieval documents of about seq_len tokens are
added (herd.data.synthetic); anything given on the command line comes last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

EXPLICIT = {"out_dir", "max_steps", "init", "data", "seq_len"}  # fields with their own documented flags
STAGE = ("steps", "warmup", "lr", "min_lr", "eval_every", "ckpt_every")  # what mid-training takes from its preset
LONG = ("passkey", "kv")  # long-context sources mid-training adds to the run's data


def add_train_parser(subparsers) -> None:
    from herd.train.train_config import TrainConfig

    def common(sp):
        sp.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, plots, hf/)")
        sp.add_argument("--max-steps", type=int, help="stop after this step")
        sp.add_argument("--config", help="JSON or TOML file of TrainConfig fields")
        sp.add_argument("--data", help="sources joined by '+': builtin, passkey, kv, or .txt / .jsonl paths")
        sp.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int,
                        help="tokens per row (midtrain default: 4x the run's)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields, e.g. lr=1e-3")
        for f in dataclasses.fields(TrainConfig):  # every field as --key=value (hidden from --help: see the docs)
            if f.name not in EXPLICIT:
                names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
                sp.add_argument(*names, dest=f"set_{f.name}", metavar="VALUE", help=argparse.SUPPRESS)

    sp = subparsers.add_parser("train", help="pretrain a model (tiny presets run on a laptop CPU)",
                               description="Train from scratch or resume. Any TrainConfig field: --key=value.")
    sp.add_argument("--preset", default="tiny", help="training preset (herd.train.train_config.TRAIN_PRESETS)")
    sp.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                    help="continue the run in DIR (or in --out) from its newest checkpoint")
    sp.add_argument("--init", help="start from these weights (a run directory or a Hugging Face checkpoint)")
    common(sp)
    sp.set_defaults(fn=run_train, stage="train")
    sp = subparsers.add_parser("midtrain", help="continue a run at a longer context (mid-training)",
                               description="Continue from a run's checkpoint at a longer sequence length.")
    sp.add_argument("--init", required=True, help="the run to continue from (its directory or a checkpoint)")
    sp.add_argument("--resume", action="store_true", help="continue this mid-training run from its checkpoint")
    common(sp)
    sp.set_defaults(fn=run_train, stage="midtrain", preset="tiny-midtrain")
    # herd sft / herd dpo (herd.post): the same loop on chats (--data: sft_data) or on preference pairs (--pairs)
    for stage, help_, what, init_help in (
            ("sft", "supervised fine-tuning on chats (.jsonl or tasks:NAME), easy data pruned",
             "Fine-tune a checkpoint on conversations, loss on the assistant's tokens only. prune_easy=0.5 drops the "
             "half a judge finds easiest.", "the model to tune (a run directory or a Hugging Face checkpoint)"),
            ("dpo", "direct preference optimisation on (chosen, rejected) pairs (.jsonl)",
             "Tune a checkpoint on preference pairs with the DPO loss, the checkpoint itself as the frozen "
             "reference.", "the model to tune, also the reference (a run directory or a HF checkpoint)"),
            ("rl", "online RL on verifiable tasks (GRPO/DAPO, pool re-filtering, curriculum, async)",
             "Tune a checkpoint by online RL: answers sampled from the policy, scored by the tasks' verifiers.",
             "the model to tune (a run directory or a Hugging Face checkpoint, e.g. an SFT run's hf/)")):
        sp = subparsers.add_parser(stage, help=help_, description=f"{what} Any TrainConfig field: key=value.")
        sp.add_argument("--init", help=init_help)
        if stage == "dpo":
            sp.add_argument("--pairs", help="a .jsonl of {\"messages\", \"chosen\", \"rejected\"} lines (dpo_pairs)")
            sp.add_argument("--from-rollouts", dest="from_rollouts",
                            help="pairs from an RL run's rollouts.jsonl, or tasks:NAME[,NAME][@D] to sample the "
                                 "init model's own answers (dpo_rollouts; prefer=correct|shorter)")
        if stage == "rl":
            sp.add_argument("--tasks", help="tasks with optional difficulty caps, e.g. arithmetic@3,sorting (rl_tasks)")
        sp.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                        help=f"continue the {stage.upper()} run in DIR (or in --out) from its newest checkpoint")
        sp.add_argument("--preset", default=stage, help="training preset (herd.train.train_config.TRAIN_PRESETS)")
        common(sp)
        sp.set_defaults(fn=run_train, stage=stage)


    sp = subparsers.add_parser("recipe", help="pretrain -> SFT -> RL -> DPO, each evaluated, and a report card",
                               description="The post-training recipe end to end on the built-in data and tasks "
                                           "(herd.post.recipe); resumable: a finished stage is skipped.")
    sp.add_argument("--preset", default="demo", help="recipe preset (herd.post.recipe.RECIPE_PRESETS)")
    sp.add_argument("--out", help="run directory (one folder per stage, report.md, report.json, plots)")
    sp.add_argument("--stages", help="some of base,contrastive,align,joint,sft,rl,dpo in that order (default: all)")
    sp.add_argument("--init", help="the model the first stage starts from when base is not run")
    sp.add_argument("--seed", type=int)
    sp.set_defaults(fn=run_recipe)

    sp = subparsers.add_parser("upcycle", help="turn a dense checkpoint into a Llama 4 MoE (sparse upcycling)",
                               description="Copy each dense FFN into the shared expert and every routed expert of a "
                                           "Llama 4 MoE layer, scaled so the result computes the dense model "
                                           "(herd.train.upcycle); continue it with herd train --init OUT.")
    sp.add_argument("--init", required=True, help="the dense model: a Hugging Face dir (herd or Llama) or a run")
    sp.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer (top-1, plus shared)")
    sp.add_argument("--out", required=True, help="where the MoE checkpoint (Hugging Face format) is written")
    sp.add_argument("--every", type=int, default=1, choices=(1, 2),
                    help="1: every layer becomes MoE (Scout); 2: every second one (Maverick)")
    sp.add_argument("--router-std", dest="router_std", type=float, default=0.0,
                    help="router init noise; 0 (default) reproduces the dense model exactly at the first step")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype on disk")
    sp.set_defaults(fn=run_upcycle)


def run_upcycle(args) -> int:
    import torch

    from herd.config import ConfigError
    from herd.formats.hf_integrity import CheckpointError
    from herd.train.upcycle import upcycle_checkpoint

    try:
        r = upcycle_checkpoint(args.init, args.out, args.experts, args.every, args.router_std,
                               getattr(torch, args.dtype))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"upcycled {args.init} -> {r.out}: {len(r.moe_layers)} of {r.config.num_hidden_layers} layers MoE with "
          f"{r.config.num_local_experts} experts + shared; max |logit difference| from the dense model on a probe "
          f"batch: {r.max_logit_diff:.2e}\ncontinue it: herd train --init {r.out} --out runs/upcycled")
    return 0


def run_recipe(args) -> int:
    from herd.config import ConfigError
    from herd.data.sources import DataError
    from herd.post.recipe import recipe, recipe_preset

    given = {"out_dir": args.out, "init": args.init, "seed": args.seed,
             "stages": tuple(s.strip() for s in args.stages.split(",")) if args.stages else None}
    try:
        cfg = recipe_preset(args.preset, **{k: v for k, v in given.items() if v is not None})
        out = recipe(cfg)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = Path(cfg.out_dir) / cfg.stages[-1] / "hf"
    print(f"done in {out['time_s']:.0f}s: report card {out['report']} ({out['report_json']})\n"
          f"chat with the final model: herd chat --model {last}")
    return 0


def _overrides(args) -> list[str]:
    items = list(args.overrides)
    for key, v in vars(args).items():
        if key.startswith("set_") and v is not None:
            items.append(f"{key.removeprefix('set_')}={v}")
    named = {"pairs": "dpo_pairs", "from_rollouts": "dpo_rollouts", "tasks": "rl_tasks"}
    for key in ("data", "seq_len", "init", "pairs", "from_rollouts", "tasks"):
        if getattr(args, key, None) is not None:
            field = "sft_data" if key == "data" and args.stage == "sft" else named.get(key, key)
            items.append(f"{field}={getattr(args, key)}")
    return items


def _midtrain_base(args):
    """The run's own config with the mid-training schedule, at the new length with the run's tokens per step."""
    from herd.train.train_config import from_dict, load_file, train_preset

    stage = train_preset(args.preset)
    init = Path(args.init)  # a run directory, or one of its checkpoints (run/ckpt/step_N)
    saved = [f for d in (init, init.parent, init.parent.parent) if (f := d / "train_config.json").is_file()]
    run = from_dict(load_file(saved[0])) if saved else train_preset("tiny")
    seq_len = args.seq_len or 4 * run.seq_len
    batch = max(1, run.batch_size * run.seq_len // seq_len)
    data = "+".join([run.data] + [s for s in LONG if s not in run.data.split("+")])
    return run.replace(**{k: getattr(stage, k) for k in STAGE}, max_steps=None, seq_len=seq_len, batch_size=batch,
                       data=data)


def build_config(args):
    """(TrainConfig, resume) from parsed `herd train` / `herd midtrain` arguments."""
    from herd.train.train_config import from_dict, load_file, train_preset, with_overrides

    out = args.resume if isinstance(args.resume, str) else args.out
    if args.resume and not out:
        raise ValueError("--resume needs the run directory: --resume DIR or --out DIR")
    if args.stage == "midtrain" and not out:
        raise ValueError("midtrain needs --out: a new directory for the mid-training run")
    saved = Path(out) / "train_config.json" if out else None
    if args.resume and saved.is_file():
        cfg = from_dict(load_file(saved))  # the run's own settings; the command line may still change some
    elif args.stage == "midtrain":
        cfg = _midtrain_base(args)
    else:
        cfg = train_preset(args.preset)
    explicit_steps = False
    if args.config:
        file = load_file(args.config)
        explicit_steps = "steps" in file
        cfg = from_dict(file, base=cfg)
    items = _overrides(args)
    explicit_steps |= any(i.removeprefix("--").split("=")[0] == "steps" for i in items)
    cfg = with_overrides(cfg, items)
    if out:
        cfg = cfg.replace(out_dir=str(out))
    if args.max_steps is not None:
        fresh = not (args.resume and saved.is_file())
        if fresh and not explicit_steps:  # plan the schedule over the requested length
            warmup = cfg.warmup if cfg.warmup <= args.max_steps else args.max_steps // 10
            cfg = cfg.replace(steps=max(args.max_steps, 1), warmup=warmup)
        cfg = cfg.replace(max_steps=args.max_steps)
    return cfg, bool(args.resume)


def run_train(args) -> int:
    from herd.config import ConfigError
    from herd.data.sources import DataError
    from herd.train.distributed import cleanup
    from herd.train.snapshots import CheckpointCorrupt, CheckpointDiskFull
    from herd.train.trainer import TrainingDiverged, train

    if args.stage == "sft":
        from herd.post.sft import sft as train
    elif args.stage == "dpo":
        from herd.post.dpo import dpo as train
    elif args.stage == "rl":
        from herd.post.rl import rl as train
    try:
        cfg, resume = build_config(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    what = {"midtrain": "mid-training", "sft": f"SFT on {cfg.sft_data}",
            "dpo": f"DPO (beta {cfg.beta}) on {cfg.dpo_pairs or cfg.dpo_rollouts}",
            "rl": f"RL on {cfg.rl_tasks}"}.get(args.stage, "training")
    if main and args.stage == "rl":
        print(f"{what} {cfg.init} -> {cfg.out_dir}: {cfg.stop_step} steps of {cfg.batch_size * cfg.grad_accum} "
              f"prompts x {cfg.group_size} answers, {'async' if cfg.rl_async else 'sync'}, generator "
              f"{cfg.generator}, lr {cfg.lr}", flush=True)
    elif main:
        print(f"{what} {cfg.init or cfg.model} -> {cfg.out_dir}: {cfg.stop_step} steps of {cfg.batch_size}x"
              f"{cfg.seq_len} tokens x {cfg.grad_accum}, {cfg.dtype}, lr {cfg.lr} ({cfg.schedule})", flush=True)
    try:
        summary = train(cfg, resume=resume)
    except (TrainingDiverged, CheckpointCorrupt, CheckpointDiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cleanup()  # end the process group before exit: a gloo rank torn down with it alive can abort (SIGABRT)
    if not main:
        return 0
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    if "val_pass@1" in summary:
        val = f", held-out greedy pass@1 {summary['val_pass@1']:.3f}, {summary['rollout_tokens']:.0f} rollout tokens"
    bpb = f", {summary['val_bpb']:.4f} bits/byte" if summary.get("val_bpb") is not None else ""
    print(f"done: step {summary['step']}{val}{bpb} in {summary['time_s']:.0f}s; checkpoint {summary['checkpoint']}"
          + (f"; Hugging Face weights in {summary['hf']}" if summary["hf"] else ""))
    if summary["hf"] and args.stage in ("sft", "dpo", "rl"):
        print(f"try it: herd chat --model {summary['hf']}")
    elif summary["hf"]:
        print(f"try it: herd generate --model {summary['hf']} --raw --prompt \"To be, or not to be\"")
        if cfg.image_rows and cfg.samples:
            print(f"        herd generate --model {summary['hf']} --image {cfg.out_dir}/scene_0.png "
                  f"--prompt \"How many shapes are there?\"")
    return 0
