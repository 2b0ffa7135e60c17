"""The whole post-training recipe in one call: pretrain -> SFT -> online RL -> DPO, each stage evaluated, one report.

    recipe(recipe_preset("demo", out_dir="runs/recipe"))          # every stage, then runs/recipe/report.md
    recipe(recipe_preset("demo", stages=("base", "sft")))          # some of them

Stages, each in its own folder under out_dir and each starting from the previous one's Hugging Face export:
- base: pretraining on the built-in corpus (herd.train.trainer, preset "tiny");
- contrastive, align, joint: the vision encoder's stages (herd.train.vision_stages): a fresh tower on the base
  model, trained against the frozen decoder's caption embeddings, then on scene questions with the decoder frozen,
  then jointly with text (early fusion) with the tower frozen; from here on the model is multimodal and every
  evaluation also asks held-out scene questions with the right image and with another scene's
  (herd.train.vision_diagnostics.look_report);
- sft: supervised fine-tuning on the tasks' reference answers (herd.post.sft, preset "sft", `tasks:...` data);
- rl: online RL on the same tasks with their verifiers as reward (herd.post.rl, preset "rl");
- dpo: preference pairs built from the RL run's rollouts, right answers over wrong ones (herd.post.dpo, preset
  "dpo"); without an rl stage, from the starting policy's own samples.
This is the order of Llama 4's post-training: lightweight SFT, then online RL, then lightweight DPO ("The Llama 4
herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/), with a pretraining run in front so it runs end to
end.

After each stage the model is evaluated (herd.post.evaluate) on the same held-out prompts with the same sample seeds,
so the report card (herd.post.report, after nanochat's) compares models, not draws.

Resumable: a stage whose folder already holds hf/ and eval/results.json is skipped; one trained but not evaluated
is only evaluated; one interrupted mid-training continues from its newest checkpoint (the trainer's exact resume).
Delete a stage's folder to run it again (the stages after it do not notice: delete theirs too).

Sizes are fields, not constants: `demo` is sized for `make demo` on a 2-core CPU, `smoke` for tests. `overrides`
passes TrainConfig fields to one stage's run, e.g. {"base": {"seq_len": 32}}.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from herd.config import ConfigError
from herd.post.report import STAGE_FILE, Stage, load_stage, make_report, save_stage, stage_metrics, system_info

STAGES = ("base", "contrastive", "align", "joint", "sft", "rl", "dpo")
VISION = ("contrastive", "align", "joint")
TEXT = ("base", "sft", "rl", "dpo")
REFERENCE = "reference"  # the folder and report column of RecipeConfig.reference
PRESET = {"base": "tiny", "contrastive": "vision-contrastive", "align": "vision-align", "joint": "tiny-multimodal",
          "sft": "sft", "rl": "rl", "dpo": "dpo"}  # each stage's training preset (TRAIN_PRESETS)


@dataclass(kw_only=True)
class RecipeConfig:
    out_dir: str = "runs/recipe"
    seed: int = 0
    stages: tuple[str, ...] = STAGES  # which of STAGES to run, in that order
    init: str | None = None  # the model the first stage starts from when "base" is not run (default: out/PREV/hf)
    # text tasks the tiny tokenizer spells in few tokens and the tiny model can learn (herd.tasks)
    tasks: tuple[str, ...] = ("arithmetic", "sorting", "counting")
    difficulty: int = 1  # SFT examples, RL's highest difficulty, and the evaluation's difficulty
    pretrain_steps: int = 600
    contrastive_steps: int = 1500
    align_steps: int = 200
    joint_steps: int = 600
    vision: str = "tiny"  # the vision tower's preset (herd.config.VISION_PRESETS)
    # from the vision stages on, one attention chunk holds a scene chat whole, as Llama 4's 8192-token chunks hold
    # an image and its question: with the tiny preset's 16, only the one global layer sees the image from the answer
    image_chunk: int = 128
    scene_eval: int = 100  # held-out scene questions per evaluation of a multimodal stage (right / other image)
    sft_steps: int = 600
    sft_examples: int = 2000  # per task
    rl_steps: int = 30
    dpo_steps: int = 30
    eval_n_per_task: int = 16  # held-out prompts per task
    eval_k: int = 4  # samples per prompt (pass@k)
    eval_temperature: float = 1.0
    eval_max_new_tokens: int = 48  # the tasks' reference answers at difficulty 1 are under 40 tiny-tokenizer tokens
    bpb_batches: int = 4  # held-out text batches for bits per byte (0: not measured)
    device: str = "auto"
    # a model evaluated as the stages are, its column in the report card beside theirs: a checkpoint folder or
    # .gguf, or "default" for herd's default model (herd.default_model, SmolLM2-135M-Instruct); None: none
    reference: str | None = None
    overrides: dict[str, dict] = field(default_factory=dict)  # stage -> TrainConfig fields for that stage's run

    def __post_init__(self) -> None:
        from herd import tasks as registry

        self.stages, self.tasks = tuple(self.stages), tuple(self.tasks)
        if not self.stages or [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ConfigError(f"stages must be some of {STAGES}, each once and in that order; got {self.stages}")
        if unknown := [s for s in self.overrides if s not in STAGES]:
            raise ConfigError(f"overrides are keyed by stage ({', '.join(STAGES)}); got {unknown}")
        for name in self.tasks:
            task = registry.TASKS.get(name)
            if task is None or task.multimodal:
                text = [n for n, t in registry.TASKS.items() if not t.multimodal]
                raise ConfigError(f"tasks must be text tasks from {text}; got {name!r}")
            if not 1 <= self.difficulty <= task.max_difficulty:
                raise ConfigError(f"difficulty {self.difficulty} is outside {name}'s 1..{task.max_difficulty}")
        sizes = (self.pretrain_steps, self.sft_steps, self.sft_examples, self.rl_steps, self.dpo_steps,
                 self.eval_n_per_task, self.eval_k, self.eval_max_new_tokens, self.contrastive_steps,
                 self.align_steps, self.joint_steps, self.image_chunk, self.scene_eval)
        if min(sizes) < 1 or self.bpb_batches < 0 or self.eval_temperature <= 0:
            raise ConfigError("steps, sft_examples, eval_n_per_task, eval_k and eval_max_new_tokens must be >= 1, "
                              "bpb_batches >= 0 and eval_temperature > 0")

    def replace(self, **kw) -> RecipeConfig:
        return dataclasses.replace(self, **kw)


# RL at smoke size: two answers per prompt, short answers, a small prompt pool, one sampling round
SMOKE_RL = {"group_size": 2, "max_new_tokens": 16, "pool_size": 4, "pool_k": 2, "rl_eval_prompts": 2, "max_rounds": 1}

RECIPE_PRESETS: dict[str, dict] = {
    # `make demo`: the four stages and five evaluations on a 2-core CPU in about ten minutes. The stage sizes are the
    # dials; pretraining gets the largest share because everything after it stands on it.
    # SFT at 4x the "sft" preset's LR: the tiny model is far smaller than what that LR was chosen for, and at 5e-4
    # its answer loss is still falling fast when the run ends (a two-point LR comparison on these tasks)
    # Sorting is left out: the tiny model stays at 0 on it after SFT, so it gives RL no signal (every group's
    # rewards are equal) and the evaluation nothing to compare. 32 held-out prompts per task: differences between
    # stages of a few hundredths are still noise at 16. The reference column: SmolLM2-135M-Instruct, a real model
    # 180 times the tiny one's size, asked the same questions in its own chat template.
    "demo": dict(out_dir="runs/recipe", stages=TEXT, tasks=("arithmetic", "counting"), pretrain_steps=1200,
                 sft_steps=600, sft_examples=2000, rl_steps=30, dpo_steps=30, eval_n_per_task=32, reference="default",
                 overrides={"sft": {"lr": 2e-3, "min_lr": 2e-4}}),
    # `make demo-multimodal`: the demo with the vision stages between pretraining and SFT (herd.train.vision_stages)
    "demo-multimodal": dict(out_dir="runs/recipe-multimodal", tasks=("arithmetic", "counting"), pretrain_steps=1200,
                            contrastive_steps=3000, align_steps=200, joint_steps=800, sft_steps=600,
                            sft_examples=2000, rl_steps=30, dpo_steps=30, eval_n_per_task=32,
                            overrides={"sft": {"lr": 2e-3, "min_lr": 2e-4}}),
    # tests and CI: seconds per stage, nothing learned
    "smoke": dict(out_dir="runs/recipe-smoke", pretrain_steps=4, sft_steps=4, sft_examples=8, rl_steps=2,
                  dpo_steps=2, eval_n_per_task=2, eval_k=2, eval_max_new_tokens=8, bpb_batches=1,
                  contrastive_steps=2, align_steps=2, joint_steps=2, scene_eval=2,
                  overrides={s: {"seq_len": 32 if s == "base" else 160, "batch_size": 2, "eval_batches": 1,
                                 "eval_every": 2, "ckpt_every": 2, "log_every": 1, "samples": False,
                                 **(SMOKE_RL if s == "rl" else {})} for s in STAGES}),
}


def recipe_preset(name: str, **overrides) -> RecipeConfig:
    if name not in RECIPE_PRESETS:
        raise ConfigError(f"unknown recipe preset {name!r}; choose one of {sorted(RECIPE_PRESETS)}")
    return RecipeConfig(**{**RECIPE_PRESETS[name], **overrides})


# ---- one stage -------------------------------------------------------------------------------------------------------
def _multimodal(cfg: RecipeConfig) -> bool:
    """Whether the recipe trains a tower: then its text post-training keeps scene questions in its mix."""
    return any(s in VISION for s in cfg.stages)


def stage_config(cfg: RecipeConfig, name: str, init: str | None):
    """The TrainConfig of stage `name` (starting from `init`), from its preset, the recipe and `overrides`."""
    from herd.train.train_config import TRAIN_PRESETS, TrainConfig, train_preset

    out = Path(cfg.out_dir)
    spec = ",".join(cfg.tasks)
    steps = {"base": cfg.pretrain_steps, "contrastive": cfg.contrastive_steps, "align": cfg.align_steps,
             "joint": cfg.joint_steps, "sft": cfg.sft_steps, "rl": cfg.rl_steps, "dpo": cfg.dpo_steps}[name]
    kw: dict = {"out_dir": str(out / name), "seed": cfg.seed, "steps": steps, "device": cfg.device, "warmup": 0}
    if name != "base":
        kw["init"] = init
    if name in VISION:  # a text init gets a fresh tower; the chunk holds a scene chat (RecipeConfig.image_chunk)
        kw |= {"vision": cfg.vision, "model_overrides": {"attention_chunk_size": cfg.image_chunk},
               "scene_eval": cfg.scene_eval if name != "contrastive" else 0,
               "eval_every": max(steps // 4, 1)}  # look.png's points; the stage's evaluation reports the end
    if name == "joint":  # QA rows beside the text, the contrastive tower kept as it is
        kw |= {"image_rows": 8, "scene_task": "qa", "freeze": "tower", "lr": 2e-3, "min_lr": 2e-4}
    if name == "sft":
        scenes = "+scenes:qa" if _multimodal(cfg) else ""  # keep what the joint stage taught
        kw |= {"sft_data": f"tasks:{spec}@{cfg.difficulty}{scenes}", "sft_examples": cfg.sft_examples}
    if name in ("rl", "dpo"):  # rollouts as long as the evaluation's answers: longer ones would score as truncated
        kw["max_new_tokens"] = cfg.eval_max_new_tokens
    if name == "rl":
        kw["rl_tasks"] = ",".join(f"{t}@{cfg.difficulty}" for t in cfg.tasks)
    if name == "dpo":  # the RL run's rollouts when it ran, else samples of the starting policy (herd.post.dpo_pairs)
        rollouts = out / "rl" / "rollouts.jsonl"
        kw["dpo_rollouts"] = str(rollouts) if rollouts.is_file() else f"tasks:{spec}@{cfg.difficulty}"
    given = cfg.overrides.get(name, {})
    tcfg = train_preset(PRESET[name], **{**kw, **given})
    if "warmup" not in given:  # the preset's warmup, within a run shortened below it
        preset_warmup = TRAIN_PRESETS[PRESET[name]].get("warmup", TrainConfig.warmup)
        tcfg = tcfg.replace(warmup=min(preset_warmup, tcfg.steps // 10))
    return tcfg


def train_stage(name: str, tcfg) -> dict:
    """Run (or continue, from its newest checkpoint) one stage's training; the trainer's summary."""
    if name in ("base", *VISION):
        from herd.train.trainer import train

        return train(tcfg, resume=True)  # resume=True also starts a fresh run when there is no checkpoint
    if name == "sft":
        from herd.post.sft import sft

        return sft(tcfg, resume=True)
    if name == "rl":
        from herd.post.rl import rl

        return rl(tcfg, resume=True)
    from herd.post.dpo import dpo

    return dpo(tcfg, resume=True)


def evaluate_stage(cfg: RecipeConfig, hf_dir: str | Path) -> dict:
    """herd.post.evaluate on the held-out split, with the recipe's prompts, seeds and sizes (the same every stage)."""
    import torch

    from herd.formats.hf import from_pretrained
    from herd.post.evaluate import evaluate, progress_printer
    from herd.tokenizer import Tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model = from_pretrained(hf_dir, device=device).eval()
    tok = Tokenizer.from_pretrained(hf_dir)
    results = evaluate(model, tok, list(cfg.tasks), n_per_task=cfg.eval_n_per_task,
                       difficulties=[cfg.difficulty], k=cfg.eval_k, temperature=cfg.eval_temperature,
                       max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, split="heldout",
                       bpb_batches=cfg.bpb_batches, progress=progress_printer())
    results["model"] = str(hf_dir)
    if model.vision_config is not None:  # does it look? (the same held-out scenes at every stage)
        from herd.train.vision_diagnostics import look_report

        results["look"] = look_report(model, tok, model.vision_config, cfg.seed, cfg.scene_eval, 56)
        look = results["look"]
        print(f"scene questions: {look['scene_right']:.2f} right with their image, {look['scene_other']:.2f} with "
              f"another scene's, {look['scene_chance']:.2f} from the question alone", flush=True)
    return results


def run_stage(cfg: RecipeConfig, name: str, init: str | None, banner: str) -> Stage:
    """Train (unless done) and evaluate (unless done) one stage; its Stage record (module docstring: resuming)."""
    from herd.post.evaluate import write_results

    run_dir = Path(cfg.out_dir) / name
    hf, results = run_dir / "hf", run_dir / "eval" / "results.json"
    if hf.is_dir() and results.is_file():
        print(f"{banner}: already complete in {run_dir}, skipped", flush=True)
        return load_stage(name, run_dir)
    print(f"{banner}: {init or 'from scratch'} -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    if hf.is_dir() and (run_dir / STAGE_FILE).is_file():  # trained by an earlier call that stopped before the eval
        stage = load_stage(name, run_dir)
        print(f"{name}: trained earlier; evaluating", flush=True)
    else:
        summary = train_stage(name, stage_config(cfg, name, init))
        rollout = summary.get("rollout_tokens")  # rl keeps it as a float (a running sum); it counts tokens
        stage = Stage(name, str(run_dir), time.perf_counter() - t0, summary.get("tokens"),
                      None if rollout is None else int(rollout))
        save_stage(stage)  # the training's cost is kept even if the evaluation is interrupted
    t1 = time.perf_counter()
    stage.eval = evaluate_stage(cfg, hf)
    write_results(stage.eval, run_dir / "eval")
    stage.wall_clock_s = (stage.wall_clock_s or 0.0) + time.perf_counter() - t1
    save_stage(stage)
    m = stage_metrics(stage)
    print(f"{name} done in {_clock(time.perf_counter() - t0)}: pass@1 {m['pass@1']:.3f}, pass@{cfg.eval_k} "
          f"{m['pass@k']:.3f}, mean reward {m['mean_reward']:.3f}", flush=True)
    return stage


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _start(cfg: RecipeConfig) -> str | None:
    """What the first stage run starts from: nothing for base, else `init`, else the export of the stage before."""
    first = cfg.stages[0]
    if first == "base":
        return None
    if cfg.init:
        return cfg.init
    before = Path(cfg.out_dir) / STAGES[STAGES.index(first) - 1] / "hf"
    if not before.is_dir():
        raise ConfigError(f"stage {first} needs a model to start from: run the stage before it (stages="
                          f"{STAGES[:STAGES.index(first) + 1]}), or set init=DIR (a Hugging Face checkpoint)")
    return str(before)


# ---- the recipe ------------------------------------------------------------------------------------------------------
def recipe(cfg: RecipeConfig) -> dict:
    """Run cfg.stages in order (resuming what is done), then write out_dir/report.md, report.json and the plots.
    Returns {"stages": {name: metrics}, "report": report.md, "report_json": report.json, "time_s": ...}.
    A stage that fails still leaves the report card of the stages before it, then the error is raised."""
    t0, init, stages = time.perf_counter(), _start(cfg), []
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    try:
        for i, name in enumerate(cfg.stages, 1):
            banner = f"=== recipe stage {i}/{len(cfg.stages)}: {name}"
            stages.append(run_stage(cfg, name, init, banner))
            init = str(Path(cfg.out_dir) / name / "hf")
            print(f"=== recipe elapsed {_clock(time.perf_counter() - t0)}", flush=True)
    except Exception:
        if _done(cfg, stages):
            print(f"=== recipe stopped at stage {cfg.stages[len(stages)]}; the report card covers the stages done",
                  flush=True)
            make_report(cfg.out_dir, _done(cfg, stages), system_info(), file=sys.stdout)
        raise
    if cfg.reference:
        stages.append(reference_stage(cfg))
    done = _done(cfg, stages)
    md, js = make_report(cfg.out_dir, done, system_info(), file=sys.stdout)
    return {"stages": {s.name: stage_metrics(s) for s in done}, "report": str(md), "report_json": str(js),
            "time_s": time.perf_counter() - t0}


def _done(cfg: RecipeConfig, ran: list[Stage]) -> list[Stage]:
    """The stages the card shows: those run now and those a previous call completed in out_dir (stages=("rl",
    "dpo") after a base and sft run), in the recipe's order."""
    by_name = {s.name: s for s in ran}
    names = (*STAGES, REFERENCE) if cfg.reference else STAGES
    return [by_name.get(n) or load_stage(n, Path(cfg.out_dir) / n) for n in names
            if n in by_name or (Path(cfg.out_dir) / n / "eval" / "results.json").is_file()]


def reference_stage(cfg: RecipeConfig) -> Stage:
    """cfg.reference evaluated with the stages' prompts, seeds and sizes (out/reference/eval; done once): what a
    real model of another size scores on the same card. A model without Llama 4's chat tokens is asked in its own
    chat template, as herd chat would ask it (herd.post.evaluate)."""
    from herd.post.evaluate import write_results

    run_dir = Path(cfg.out_dir) / REFERENCE
    if (run_dir / "eval" / "results.json").is_file():
        return load_stage(REFERENCE, run_dir)
    path = cfg.reference
    if path == "default":
        from herd.default_model import default_model

        path = str(default_model().path)
    print(f"=== recipe reference: evaluating {path}", flush=True)
    t0 = time.perf_counter()
    stage = Stage(REFERENCE, str(run_dir))
    stage.eval = evaluate_stage(cfg, path)
    write_results(stage.eval, run_dir / "eval")
    stage.wall_clock_s = time.perf_counter() - t0
    save_stage(stage)
    return stage
