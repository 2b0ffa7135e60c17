"""Does the tiny multimodal model look after the vision encoder's own stages? Held-out scene questions answered with
the right image, with another scene's image, and from the question alone.

For each seed, from one text base (`make demo`'s pretrained model), three multimodal models with the same joint
early-fusion budget (`--joint-steps` of text rows + 8 scene-QA rows each, chunk 128 so every layer's window holds the
image and the question):
- `joint only`: a fresh tower trained only through the answers, as `herd train --preset tiny-multimodal` does;
- `contrastive + joint`: the tower first trained contrastively against the frozen decoder's caption embeddings
  (`--contrastive-steps`, herd.train.contrastive), then the same joint stage with the tower frozen;
- `contrastive + align + joint`: between the two, `--align-steps` on scene questions with the decoder and the tower
  frozen (the adapter and projector learn to be read), as `herd recipe` runs the stages;
- `token-wise contrastive + joint`: as `contrastive + joint`, with each caption token matched to its best image
  token instead of pooled embeddings compared (`contrastive_pool=tokens`, FILIP's late interaction).
Also measured, not continued: alignment with only the decoder frozen (`align, tower trained`). Reported per seed:
zero-shot retrieval after the contrastive stage, and after each model's last stage the held-out scene accuracy
with the right image, with the next scene's image, and the question-only baseline (herd.train.vision_diagnostics),
plus the projected image features' norm and spread; and, on `--family-questions` held-out questions, the same
accuracies per question family (herd.train.vision_diagnostics.family_accuracy), which tell what the image
features carry. A gap counts only beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/vision_stages.py [--seeds 0 1] [--base runs/demo/base/hf]
      .venv/bin/python experiments/vision_stages.py --reuse       (finished runs are read, not trained again)
      .venv/bin/python experiments/vision_stages.py --quick       (smoke)
Writes experiments/results/vision_stages.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path("runs/exp-vision")
RESULTS = Path("experiments/results")
CHUNK = {"attention_chunk_size": 128}
ARMS = ("joint only", "contrastive + joint", "contrastive + align + joint", "token-wise contrastive + joint")
REUSE = False  # --reuse: a run whose export exists is read from its metrics, not trained again


def run(preset: str, out: Path, **kw) -> dict:
    from herd.train import train, train_preset

    if REUSE and (out / "hf").is_dir():
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last = next(r for r in reversed(recs) if r["kind"] == "eval")
        return {**last, "hf": str(out / "hf"), "time_s": None}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(train_preset(preset, out_dir=str(out), plots=True, samples=False, **kw))
    return {**summary, "time_s": time.perf_counter() - t0}


def look(summary: dict) -> dict:
    keys = ("val_scene_right", "val_scene_other", "val_scene_chance", "val_image_norm", "val_image_spread",
            "val_text_norm")
    return {k[4:]: summary[k] for k in keys}


def joint(init: str, out: Path, seed: int, steps: int, n: int, **kw) -> dict:
    return run("tiny-multimodal", out, init=init, seed=seed, steps=steps, warmup=min(20, steps), lr=2e-3,
               min_lr=2e-4, image_rows=8, scene_task="qa", scene_eval=n, eval_every=max(steps // 4, 1),
               ckpt_every=steps, log_every=50, model_overrides=CHUNK, **kw)


def families(hf: str, seed: int, n: int) -> dict:
    """Accuracy per question family of the exported model on n held-out questions."""
    import herd
    from herd.tokenizer import Tokenizer
    from herd.train.samples import scene_accuracy

    model = herd.from_pretrained(hf).eval()
    return scene_accuracy(model, Tokenizer.from_pretrained(hf), model.vision_config, seed, n=n,
                          families=True)["scene_qa_families"]


def plot(rows: list[dict], path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    names = ARMS
    for i, name in enumerate(names):
        mine = [r[name] for r in rows]
        for j, (key, color) in enumerate((("scene_right", "tab:green"), ("scene_other", "tab:red"),
                                          ("scene_chance", "tab:gray"))):
            vals = [m[key] for m in mine]
            x = i * 4 + j
            ax.bar(x, statistics.mean(vals), color=color, alpha=0.7,
                   label=("right image", "another scene's image", "question only")[j] if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=12, zorder=3)
    ax.set_xticks([1 + 4 * i for i in range(len(names))], [n.replace(" + joint", "\n+ joint") for n in names],
                  fontsize="small")
    ax.set_ylabel("held-out scene QA accuracy")
    ax.set_title("bars: mean of the seeds, dots: each seed", fontsize="small")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/demo/base/hf", help="the text model to start from")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--contrastive-steps", type=int, default=2000)
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--joint-steps", type=int, default=800)
    ap.add_argument("--questions", type=int, default=100, help="held-out scene questions per evaluation")
    ap.add_argument("--family-questions", type=int, default=400, help="held-out questions for the per-family table")
    ap.add_argument("--reuse", action="store_true", help="read finished runs instead of training them again")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    c_steps, a_steps, j_steps, n, nf = (4, 2, 4, 4, 8) if a.quick else (
        a.contrastive_steps, a.align_steps, a.joint_steps, a.questions, a.family_questions)
    rows = []
    for seed in a.seeds:
        c = run("vision-contrastive", ROOT / f"contrastive-s{seed}", init=a.base, vision="tiny", seed=seed,
                steps=c_steps, warmup=min(50, c_steps), eval_every=max(c_steps // 6, 1), log_every=250,
                model_overrides=CHUNK)
        ct = run("vision-contrastive", ROOT / f"contrastive-tokens-s{seed}", init=a.base, vision="tiny", seed=seed,
                 steps=c_steps, warmup=min(50, c_steps), eval_every=max(c_steps // 5, 1), log_every=250,
                 model_overrides=CHUNK, contrastive_pool="tokens")
        tower = run("vision-align", ROOT / f"align-tower-s{seed}", init=c["hf"], seed=seed, steps=a_steps,
                    warmup=min(20, a_steps), scene_eval=n, eval_every=a_steps, log_every=50, freeze="decoder")
        al = run("vision-align", ROOT / f"align-s{seed}", init=c["hf"], seed=seed, steps=a_steps,
                 warmup=min(20, a_steps), scene_eval=n, eval_every=a_steps, log_every=50, freeze="decoder,tower")
        arms = {"contrastive + joint": joint(c["hf"], ROOT / f"cj-s{seed}", seed, j_steps, n, freeze="tower"),
                "contrastive + align + joint": joint(al["hf"], ROOT / f"caj-s{seed}", seed, j_steps, n,
                                                     freeze="tower"),
                "joint only": joint(a.base, ROOT / f"joint-only-s{seed}", seed, j_steps, n, vision="tiny"),
                "token-wise contrastive + joint": joint(ct["hf"], ROOT / f"cj-tokens-s{seed}", seed, j_steps, n,
                                                        freeze="tower")}
        row = {"seed": seed, "retrieval": {"i2t": c["val_i2t"], "t2i": c["val_t2i"]},
               "retrieval, token-wise": {"i2t": ct["val_i2t"], "t2i": ct["val_t2i"]},
               "align, tower trained": look(tower), "align": look(al), **{k: look(v) for k, v in arms.items()},
               "families": {k: families(v["hf"], seed, nf) for k, v in arms.items()},
               "time_s": {"contrastive": c["time_s"], "align": al["time_s"],
                          **{k: v["time_s"] for k, v in arms.items()}}}
        print(f"seed {seed}: retrieval i2t {c['val_i2t']:.2f} t2i {c['val_t2i']:.2f}; " + "; ".join(
            f"{k} {row[k]['scene_right']:.2f}/{row[k]['scene_other']:.2f}" for k in ("align, tower trained", "align",
                                                                                       *ARMS))
              + f" (right/other; chance {row['align']['scene_chance']:.2f})", flush=True)
        rows.append(row)
    print("\n| model | right image (each seed) | another scene's image | question only | image norm | spread |\n"
          "|---|---|---|---|---|---|")
    for name in ("align, tower trained", "align", *ARMS):
        cell = lambda k, name=name: ", ".join(f"{r[name][k]:.2f}" for r in rows)  # noqa: E731
        print(f"| {name} | {cell('scene_right')} | {cell('scene_other')} | {cell('scene_chance')} | "
              f"{cell('image_norm')} | {cell('image_spread')} |")
    print(f"\nper question family, {nf} held-out questions: right image / another scene's image (each seed); question "
          "only\n\n| model | " + " | ".join(rows[0]["families"]["joint only"]) + " |\n|---|"
          + "---|" * len(rows[0]["families"]["joint only"]))
    for name in ARMS:
        cells = [", ".join(f"{r['families'][name][f]['right']:.2f}/{r['families'][name][f]['other']:.2f}"
                           for r in rows) for f in rows[0]["families"][name]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| question only | " + " | ".join(", ".join(f"{r['families']['joint only'][f]['question_only']:.2f}"
                                                      for r in rows) for f in rows[0]["families"]["joint only"])
          + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "vision_stages_quick" if a.quick else "vision_stages"
    (RESULTS / f"{name}.json").write_text(json.dumps({"base": a.base, "contrastive_steps": c_steps,
                                                      "align_steps": a_steps, "joint_steps": j_steps,
                                                      "questions": n, "family_questions": nf, "runs": rows},
                                                     indent=2) + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
