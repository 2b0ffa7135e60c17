"""PNG plots of a run, drawn from its metrics.jsonl alone (so they can be redrawn for any run, finished or not).

- loss.png: training loss (every step, faint, and a moving average) and validation loss against the step;
  validation bits per byte on a second axis when it was measured;
- expert_load.png: one panel per MoE layer, the share of tokens each expert received over time. With perfect
  balance every line sits at 1/E (dashed); aux-loss-free balancing should pull the lines toward it.
- look.png (multimodal runs with scene_eval > 0): held-out scene accuracy with the right image, another image and
  the question alone, and each layer's attention share on the image tokens (herd.train.vision_diagnostics).

matplotlib's Agg backend: files only, no display needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records: list[dict], path: str | Path) -> None:
    plt = pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]  # RL evaluates accuracy instead
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, loss, color="tab:blue", lw=0.6, alpha=0.35)
    k = max(1, len(loss) // 40)  # moving average over ~1/40 of the run: the trend through step-to-step noise
    avg = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, avg, color="tab:blue", lw=1.5, label=f"train loss ({k}-step mean)" if k > 1 else "train loss")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", label="val loss", ms=3)
    img = [r for r in val if r.get("val_image_loss") is not None]
    if img:  # image-text runs: the loss on held-out answers about images
        ax.plot([r["step"] for r in img], [r["val_image_loss"] for r in img], "^-", color="tab:purple", ms=3,
                label="val loss, image answers")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    bpb = [r for r in val if r.get("val_bpb") is not None]
    if bpb:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in bpb], [r["val_bpb"] for r in bpb], "s--", color="tab:green", ms=3,
                 label="val bits/byte")
        ax2.set_ylabel("bits per byte")
        ax2.legend(loc="upper right", bbox_to_anchor=(1, 0.82))
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: str | Path) -> bool:
    """Returns False (and writes nothing) when the run logged no expert loads (a dense model)."""
    train = [r for r in records if r.get("kind") == "train" and r.get("expert_load")]
    if not train:
        return False
    plt = pyplot()
    steps = [r["step"] for r in train]
    n_layers, n_experts = len(train[0]["expert_load"]), len(train[0]["expert_load"][0])
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for layer in range(n_layers):
        ax = axes[layer // cols][layer % cols]
        for e in range(min(n_experts, 16)):  # beyond 16 lines a panel is unreadable; the first 16 show the trend
            ax.plot(steps, [r["expert_load"][layer][e] for r in train], lw=1)
        ax.axhline(1 / n_experts, color="k", ls="--", lw=0.8)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for k in range(n_layers, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("share of tokens")
    fig.suptitle(f"expert load ({n_experts} experts; dashed: uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_rl(records: list[dict], path: str | Path) -> bool:
    """An RL run: reward and pass rate of the training rollouts per step, held-out greedy pass@1 at evaluations."""
    train = [r for r in records if r.get("kind") == "train" and "reward_mean" in r]
    if not train:
        return False
    plt = pyplot()
    val = [r for r in records if r.get("kind") == "eval" and "val_pass@1" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward_mean"] for r in train], color="tab:blue", lw=1, label="rollout reward (mean)")
    ax.plot(steps, [r["pass_rate"] for r in train], color="tab:green", lw=1, label="rollout pass rate")
    ax.plot([r["step"] for r in val], [r["val_pass@1"] for r in val], "o-", color="tab:orange", ms=3,
            label="held-out pass@1 (greedy)")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_look(records: list[dict], path) -> bool:
    """Scene accuracy (right, other, chance), the attention-to-image share per layer, and the image features' norm
    against the text embeddings' and their spread, over the run's evaluations, as one PNG; False when the records
    hold none."""
    rows = [r for r in records if r.get("kind") == "eval" and "val_scene_right" in r]
    if not rows:
        return False
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = [r["step"] for r in rows]
    for key, label in (("val_scene_right", "right image"), ("val_scene_other", "another scene's image"),
                       ("val_scene_chance", "question only (chance)")):
        a.plot(steps, [r[key] for r in rows], marker="o", label=label)
    a.set(xlabel="step", ylabel="held-out scene QA accuracy", ylim=(0, 1), title="Does the model look?")
    a.legend(), a.grid(alpha=0.3)
    layers = sorted(int(k.rsplit("L", 1)[1]) for k in rows[-1] if k.startswith("val_attn_image_L"))
    for i in layers:
        b.plot(steps, [r.get(f"val_attn_image_L{i}", float("nan")) for r in rows], marker="o", label=f"layer {i}")
    b.set(xlabel="step", ylabel="attention share on image tokens", title="answer position -> image tokens")
    b.legend(), b.grid(alpha=0.3)
    c.plot(steps, [r["val_image_norm"] / r["val_text_norm"] for r in rows], marker="o", color="tab:purple",
           label="image token norm / text embedding norm")
    c.set_yscale("log")
    c.set(xlabel="step", title="projected image features")
    c2 = c.twinx()
    c2.plot(steps, [r["val_image_spread"] for r in rows], marker="s", color="tab:orange", label="spread across images")
    c2.set_ylabel("spread across images (0: collapsed)")
    handles = c.get_legend_handles_labels()[0] + c2.get_legend_handles_labels()[0]
    c.legend(handles=handles, fontsize="small", loc="best"), c.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_run(out_dir: str | Path) -> list[Path]:
    """Draw every plot of a run into out_dir; returns the files written."""
    out = Path(out_dir)
    records = read_metrics(out)
    written = []
    if any(r.get("kind") == "train" for r in records):
        plot_loss(records, out / "loss.png")
        written.append(out / "loss.png")
    if plot_rl(records, out / "rl.png"):
        written.append(out / "rl.png")
    if plot_expert_load(records, out / "expert_load.png"):
        written.append(out / "expert_load.png")
    if plot_look(records, out / "look.png"):
        written.append(out / "look.png")
    return written
