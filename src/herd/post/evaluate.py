"""Evaluation of a chat model on verifiable tasks (herd.tasks), and bits per byte on held-out text.

    results = evaluate(model, tokenizer, ["arithmetic", "sorting"], n_per_task=32, difficulties=[1, 2], k=8)
    write_results(results, "runs/x/eval")        # results.json + results.md

What is measured, per task and difficulty, and over everything evaluated (`total`):
- Every prompt gets k completions: k requests, each with its own seed (`sample_seed`), through herd's one engine
  (herd.infer.engine), all submitted at once so the engine batches them. The seeds make a run reproducible and its
  k draws distinct, and a request's tokens do not depend on its batch neighbours (herd.infer.sampling).
- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", the Codex
  paper, arXiv:2107.03374, eq. 1): with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the
  chance that k of the n drawn without replacement include a correct one, averaged over prompts. Computed as the
  paper's numerically stable product 1 - prod_{i=n-c+1..n} (1 - k/i): the binomials overflow floats for large n.
  pass@1 is its k=1 case, the mean of c/n. Both use n = k samples per prompt here, so pass@k is "any of the k".
- mean reward (Task.score's reward), mean answer length in generated tokens (the stop token counted, as OpenAI's
  `usage` counts it), and the format-error rate: the share of completions without an answer in the expected form
  (Score.format_ok False). A request the engine ended with an error scores 0 with a format error and is counted
  in `errors`.
- bits per byte on the held-out split of the built-in corpus, computed by the trainer's own validation code
  (herd.train.validation: the same definition as a training run's val_bpb).
Tasks about images are skipped, with the reason in `skipped`, when the model has no vision tower.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.tasks.base import Example, Score, Task

Progress = Callable[[int, int, int], None]  # (completions done, completions in all, tokens generated so far)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with n samples, c of them correct (module docstring)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be ints, got {n!r}, {c!r}, {k!r}")
    if n < 1 or k < 1:
        raise ValueError(f"pass@k needs n >= 1 samples and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"the correct count c must be in 0..n={n}, got {c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per prompt, got n={n}; sample more or lower k")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---- sampling and scoring --------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """One prompt's k completions and their scores."""

    example: Example
    prompt_len: int  # prompt tokens (chat format, tools and image tokens included)
    seeds: list[int]  # each completion's request seed
    completions: list[str]  # the assistant text the verifier saw
    scores: list[Score]
    lengths: list[int]  # generated tokens per completion
    errors: list[str | None]  # the engine's message for a failed request, else None
    output_ids: list[list[int]] | None = None  # with logprobs=True: each completion's token ids (the stop included)
    logprobs: list[list[float]] | None = None  # ... and the engine's (raw) log-prob of each of them
    pixel_values: object = None  # the prompt's preprocessed images (tiles, 3, H, W), or None
    prompt_ids: list[int] | None = None  # with logprobs=True: the prompt's token ids

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.scores)


def sample_seed(seed: int, example: Example, j: int) -> int:
    """The request seed of completion j of `example`: a hash of the run's seed, the task, the problem's seed and j,
    so a prompt's draws are the same whatever else is evaluated alongside it, and runs with nearby seeds share no
    draw (seed + j would give seed 1's draw j to seed 0's draw j + 1)."""
    digest = hashlib.sha256(f"herd-eval:{seed}:{example.task}:{example.seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: within what torch.Generator.manual_seed takes


def sample_examples(model, tokenizer, tasks: Mapping[str, Task], examples: Sequence[Example], k: int = 8,
                    temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0, max_batch: int = 32,
                    progress: Progress | None = None, logprobs: bool = False) -> list[Sampled]:
    """k completions of every example through one Engine, each scored by its task's verifier (`tasks[ex.task]`).
    Images in the messages go to the model's vision tower, `example.tools` into the prompt. logprobs=True also
    returns every completion's token ids and their log-probs (what RL trains on, herd.post.rollouts)."""
    from herd.chat import default_template_spec, prepare_chat, tiling
    from herd.formats.chat_template import load_template
    from herd.infer.engine import Engine
    from herd.infer.sampling import SamplingParams

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    engine = Engine(model, tokenizer, max_batch=max_batch)
    layout = tiling(model.vision_config)
    # prompts as herd chat / herd serve render them: a checkpoint without Llama 4's chat tokens in its own template
    template = load_template(default_template_spec(tokenizer), tokenizer.chat_template)
    total, done, tokens = len(examples) * k, 0, 0

    def on_delta(req, _text: str) -> None:
        nonlocal done, tokens
        tokens += 1
        if req.finished:
            done += 1
            if progress is not None:
                progress(done, total, tokens)

    groups = []
    for ex in examples:
        try:
            ids, images = prepare_chat(ex.messages, tokenizer, tools=ex.tools, template=template, **layout)
            pixels = images.pixel_values if images is not None else None
            seeds = [sample_seed(seed, ex, j) for j in range(k)]
            params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=s,
                                     logprobs=logprobs) for s in seeds]
            reqs = [engine.request(ids, p, pixels, on_delta) for p in params]
            groups.append((ex, len(ids), seeds, reqs, pixels, ids))
        except ValueError as e:
            raise ValueError(f"task {ex.task!r}, example seed {ex.seed}: {e}") from None
    for group in groups:
        for req in group[3]:
            engine.add(req)
    engine.run()
    out = []
    for ex, prompt_len, seeds, reqs, pixels, ids in groups:
        task = tasks[ex.task]
        scores = [task.score(ex, r.text) if r.finish_reason != "error" else Score(0.0, False, False) for r in reqs]
        out.append(Sampled(ex, prompt_len, seeds, [r.text for r in reqs], scores, [len(r.output_ids) for r in reqs],
                           [r.error for r in reqs], [list(r.output_ids) for r in reqs] if logprobs else None,
                           [[lp["logprob"] for lp in r.logprobs] for r in reqs] if logprobs else None,
                           pixels, ids if logprobs else None))
    return out


def summarize(sampled: Sequence[Sampled], k: int) -> dict:
    """The metrics of a set of prompts (module docstring); every prompt must have at least k completions."""
    scores = [s for p in sampled for s in p.scores]
    n = max(len(scores), 1)
    return {
        "prompts": len(sampled),
        "samples": len(scores),
        "pass@1": _mean([pass_at_k(len(p.scores), p.correct, 1) for p in sampled]),
        "pass@k": _mean([pass_at_k(len(p.scores), p.correct, k) for p in sampled]),
        "mean_reward": sum(s.reward for s in scores) / n,
        "mean_length": sum(x for p in sampled for x in p.lengths) / n,
        "format_error_rate": sum(not s.format_ok for s in scores) / n,
        "errors": sum(e is not None for p in sampled for e in p.errors),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ---- the evaluation ------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, tasks: Sequence[str] | Mapping[str, Task], n_per_task: int = 32,
             difficulties: Sequence[int] = (1,), k: int = 8, temperature: float = 1.0, max_new_tokens: int = 64,
             seed: int = 0, split: str = "heldout", max_batch: int = 32, bpb_batches: int = 8,
             progress: Progress | None = None) -> dict:
    """Metrics per task and difficulty, and in total, over `n_per_task` prompts of each task at each difficulty
    (drawn by herd.tasks.draw from `split`), k samples each; plus `bits_per_byte` (None when bpb_batches is 0).
    `tasks`: registry names (herd.tasks.TASKS) or a {name: Task} mapping. A difficulty above a task's
    max_difficulty is skipped for that task, and a task about images on a text-only model, both with the reason
    in `skipped`."""
    from herd import tasks as registry

    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    chosen = dict(tasks) if isinstance(tasks, Mapping) else {name: registry.get(name) for name in tasks}
    skipped: dict[str, str] = {}
    examples: list[Example] = []
    t0 = time.perf_counter()
    for name, task in chosen.items():
        if task.multimodal and model.vision_config is None:
            skipped[name] = (f"{name} asks about images and this model has no vision tower; evaluate a multimodal "
                             f"checkpoint (herd init --multimodal, or train with image_rows) or leave {name} out")
            continue
        for d in difficulties:
            if not 1 <= d <= task.max_difficulty:
                skipped[f"{name}@{d}"] = f"{name} has difficulties 1..{task.max_difficulty}"
                continue
            examples += [ex if ex.task == name else _renamed(ex, name)
                         for ex in registry.draw(task, split, n_per_task, d)]
    sampled = sample_examples(model, tokenizer, chosen, examples, k, temperature, max_new_tokens, seed, max_batch,
                              progress)
    per_task = {}
    for name in chosen:
        mine = [p for p in sampled if p.example.task == name]
        if mine:
            levels = sorted({p.example.difficulty for p in mine})
            per_task[name] = {"all": summarize(mine, k), "by_difficulty": {
                str(d): summarize([p for p in mine if p.example.difficulty == d], k) for d in levels}}
    return {
        "k": k, "n_per_task": n_per_task, "difficulties": list(difficulties), "temperature": temperature,
        "max_new_tokens": max_new_tokens, "seed": seed, "split": split,
        "tasks": per_task, "total": summarize(sampled, k), "skipped": skipped,
        "bits_per_byte": held_out_bpb(model, tokenizer, bpb_batches) if bpb_batches else None,
        "time_s": time.perf_counter() - t0,
        "prompts": [{"task": p.example.task, "difficulty": p.example.difficulty, "seed": p.example.seed,
                     "correct": p.correct, "samples": len(p.scores), "first_completion": p.completions[0]}
                    for p in sampled],
    }


def _renamed(ex: Example, name: str) -> Example:
    """An example filed under the name it was asked for (a task object given under another name than its own)."""
    import dataclasses

    return dataclasses.replace(ex, task=name)


def held_out_bpb(model, tokenizer, batches: int = 8, seq_len: int | None = None, batch_size: int = 8) -> float | None:
    """Bits per byte on `batches` packed batches of the built-in corpus's validation split, by the trainer's code
    (seq_len: the trainer's default, within the model's context)."""
    from herd.train.inputs import token_bytes_table
    from herd.train.train_config import TrainConfig
    from herd.train.validation import text_loss_sums, val_batches, val_metrics

    cfg = model.text_config
    seq_len = seq_len or min(TrainConfig.seq_len, cfg.max_position_embeddings)
    tcfg = TrainConfig(data="builtin", seq_len=seq_len, batch_size=batch_size, eval_batches=batches)
    device = next(model.parameters()).device
    sums = text_loss_sums(model.eval(), val_batches(tcfg, tokenizer), token_bytes_table(tokenizer, cfg.vocab_size),
                          device)
    return val_metrics(sums.tolist())["val_bpb"]


# ---- output --------------------------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    """One row per task and difficulty, one per task over its difficulties, and the total."""
    k = results["k"]
    passes = ["pass@1"] + ([f"pass@{k}"] if k > 1 else [])  # one sample per prompt: pass@k is pass@1
    head = ["task", "difficulty", "prompts", *passes, "mean reward", "answer tokens", "format errors"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(task: str, level: str, m: dict) -> str:
        cells = [task, level, str(m["prompts"]), f"{m['pass@1']:.3f}", *([f"{m['pass@k']:.3f}"] if k > 1 else []),
                 f"{m['mean_reward']:.3f}", f"{m['mean_length']:.1f}", f"{m['format_error_rate']:.3f}"]
        return "| " + " | ".join(cells) + " |"

    for name, t in results["tasks"].items():
        rows += [row(name, d, m) for d, m in t["by_difficulty"].items()]
        if len(t["by_difficulty"]) > 1:
            rows.append(row(name, "all", t["all"]))
    rows.append(row("**total**", "", results["total"]))
    lines = rows
    if results.get("bits_per_byte") is not None:
        lines += ["", f"bits per byte on held-out text: {results['bits_per_byte']:.4f}"]
    lines += [f"skipped {name}: {why}" for name, why in results.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """results.json and results.md (the table) in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(f"# Evaluation (k={results['k']}, temperature {results['temperature']}, "
                  f"{results['split']} split)\n\n" + markdown_table(results))
    return js, md


def progress_printer(file=None, every: float = 2.0) -> Progress:
    """A `progress` callback printing completions done, rate and ETA to `file` (default: sys.stderr as it is now),
    redrawn in place on a terminal, else one line every `every` seconds."""
    file = file or sys.stderr
    start, last = time.perf_counter(), [0.0]
    tty = file.isatty()

    def show(done: int, total: int, tokens: int) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < (0.2 if tty else every):
            return
        last[0], dt = now, max(now - start, 1e-9)
        eta = int((total - done) * dt / max(done, 1))
        line = (f"eval {done}/{total} completions | {done / dt:.1f}/s | {tokens / dt / 1e3:.2f}k tok/s | "
                f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        print(("\r" + line) if tty else line, end="\n" if not tty or done == total else "", file=file, flush=True)

    return show
