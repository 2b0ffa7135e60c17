"""The pretraining / mid-training loop: `train(cfg) -> summary`, and `train(cfg, resume=True)` to continue a run.

One step: `grad_accum` packed micro-batches (herd.data.packing: documents packed into rows, attention kept inside
each document through `doc_ids`), cross-entropy over every target that is not -100, averaged over the whole step's
targets (so accumulation gives exactly the big-batch loss), plus MoE balancing, AdamW with the schedule
(herd.train.schedule), global-norm clipping. bfloat16 runs under autocast with float32 weights and optimizer state.

MoE balancing (herd.train.balance): `aux_free` (default) counts the tokens each expert receives over the step and
nudges the routers' selection biases toward the mean before the optimizer step (as torchtitan's pre-step hook, so it
composes with accumulation), then decays them to zero over the last `bias_cooldown` share of the planned steps, so
the model the run evaluates last is the one its Hugging Face export gives every engine; `aux_loss` adds
transformers' Switch loss times `aux_coef`; loads are logged and plotted always. An export that still has biases (a
run stopped before its cooldown ended, or `bias_cooldown=0`) keeps them in the weights for herd and warns, with how
much routing changes without them on the validation batches.

Measures (documented here because numbers mean nothing without their definitions):
- `val_loss` and bits per byte (`val_bpb`) over held-out text: herd.train.validation.
- FLOPs per token and the peak of MFU: herd.train.flops. MFU = FLOPs per token x tokens/s per device / peak FLOP/s
  of one device. A distillation teacher's forward pass is not counted: MFU measures the student's training.

Image-text rows (`image_rows` > 0, herd.train.inputs.ImageRows): the model is the multimodal one (vision tower +
decoder, Hugging Face `Llama4ForConditionalGeneration` layout); each micro-batch adds a forward pass over that many
chat rows with their images. The objective is (1 - image_weight) x the mean loss over the text targets +
image_weight x the mean over the answer tokens: answers are a few tokens against a thousand of text per step, and
in one plain mean they would weigh ~2% of it. Validation reports `val_image_loss` over fixed held-out chats next to
the text `val_loss` / `val_bpb`, which stay text-only so runs with and without images compare. A distillation
teacher sees the text rows only.

A non-finite loss or gradient norm stops the run before the weights are touched, with a `TrainingDiverged` error
naming the last good checkpoint (none is written after the failure).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.train import snapshots as ckpt
from herd.train import vision_stages
from herd.train.flops import default_peak_flops, flops_per_token
from herd.train.inputs import ImageRows, documents, token_bytes_table, tokenizer
from herd.train.schedule import lr_factor
from herd.train.setup import build_model, build_optimizer, objective_parameters, setup_device
from herd.train.train_config import TrainConfig
from herd.train.validation import (
    IGNORE,
    forward,
    objective_means,
    text_loss_sums,
    to_device,
    val_batches,
    val_metrics,
)

# settings that may change on resume without changing the run's numbers
RUNTIME_ONLY = ("max_steps", "out_dir", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last",
                "peak_flops", "export", "plots", "device")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the last good checkpoint."""


def train(cfg: TrainConfig, resume: bool = False, rows=None, objective=None) -> dict:
    """Run (or, with resume=True, continue from cfg.out_dir's newest checkpoint) to cfg.stop_step. `rows`, when
    given, replaces the packed documents: a function (cfg, tok, split, rank, world) -> an iterator of packed
    batches with Packer's interface (state_dict / load_state_dict); herd.post.sft passes its conversations.
    `objective`, when given, replaces the cross-entropy: (logits, batch) -> (this micro-batch's mean loss, stats
    dict); the step backpropagates the mean over its micro-batches, logs it as `loss` with the stats' means, and
    validation reports its loss as `val_loss` and each stat as `val_NAME`; herd.post.dpo passes the DPO loss. An
    objective with an `outputs(model, batch)` method is called on what that returns instead of the logits, and one
    that is an nn.Module with parameters trains them too and saves them with the checkpoint (herd.train.contrastive).
    A `cfg.stage` other than "lm" supplies both (herd.train.vision_stages)."""
    if rows is None and cfg.stage != "lm":  # a vision stage (herd.train.vision_stages)
        rows, objective = vision_stages.stage_hooks(cfg)
    return Run(cfg, resume, rows, objective).fit()


# ---- building blocks -----------------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# ---- the run -------------------------------------------------------------------------------------------------------
class Run:
    """State of one training run: model, optimizer, data position, step, metrics file."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, rows=None, objective=None):
        self.cfg, self.rows, self.objective = cfg, rows, objective  # other batches, another loss (see train)
        if objective is not None and (cfg.image_rows or cfg.teacher):
            raise ValueError("a custom objective trains text batches alone: set image_rows=0 and teacher=None")
        self.rank, self.world, self.device = setup_device(cfg)
        self.main = self.rank == 0
        self.out, self.ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt"
        start = self._checkpoint_to_resume(resume)
        torch.manual_seed(cfg.seed)
        self.tok = tokenizer(cfg)
        self.model, self.mcfg = build_model(cfg, self.device, self.world, self.tok)
        self.tcfg = self.mcfg.text_config  # the decoder's config
        if self.tok.vocab_size > self.tcfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} ids but the model only {self.tcfg.vocab_size}")
        self.opt, self.base_lrs = build_optimizer(cfg, self.model, objective_parameters(objective))
        if objective_parameters(objective) and self.world > 1:
            raise ValueError("an objective with parameters of its own (contrastive pretraining) runs in one process")
        self.teacher = self._teacher() if cfg.teacher else None
        if rows is not None:  # e.g. SFT conversations (herd.post.sft_data)
            self.data = rows(cfg, self.tok, "train", self.rank, self.world)
        else:
            from herd.data.packing import Packer

            self.data = Packer(documents(cfg, "train"), self.tok, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                               rank=self.rank, world_size=self.world)
        vcfg = self.mcfg.vision_config
        self.images = ImageRows(cfg, self.tok, vcfg, "train", self.rank, self.world) if cfg.image_rows else None
        self.val_batches, self.val_images = None, None
        self.bytes_table = token_bytes_table(self.tok, self.tcfg.vocab_size)
        self.step, self.tokens, self.saved_step, self.last_val = 0, 0, -1, {}
        if start is not None:
            self._restore(*start)
        self.batches = iter(self.data)
        self.fpt = flops_per_token(self.tcfg, cfg.seq_len)
        self.peak = cfg.peak_flops or default_peak_flops(self.device, cfg.dtype)
        n_moe = sum(self.tcfg.is_moe_layer(i) for i in range(self.tcfg.num_hidden_layers))
        self.loads = torch.zeros(n_moe, self.tcfg.num_local_experts, device=self.device)  # (L_moe, E) since last log
        self.window = {"time": 0.0, "tokens": 0, "steps": 0, "loss": 0.0}
        if self.main:
            self._init_files(fresh=start is None)

    # -- setup helpers --
    def _checkpoint_to_resume(self, resume: bool) -> tuple[Path, dict] | None:
        found = ckpt.latest(self.ckpt_root)
        if found is not None and not resume:
            raise FileExistsError(f"{self.out} already holds checkpoints (newest {found.name}): resume it "
                                  f"(--resume / resume=True) or choose another out_dir")
        ckpt.clean_partial(self.ckpt_root)
        path, files, notes = ckpt.resume_point(self.ckpt_root, set_aside=self.main)  # the newest intact one
        for note in notes if self.main else ():
            print(note, flush=True)
        return (path, files) if path is not None else None

    def _teacher(self):
        teacher, tcfg = ckpt.load_model(self.cfg.teacher)
        tcfg = tcfg.text_config
        if tcfg.vocab_size != self.tcfg.vocab_size:
            raise ValueError(f"teacher vocabulary {tcfg.vocab_size} differs from the student's {self.tcfg.vocab_size}")
        return teacher.to(self.device).eval().requires_grad_(False)

    def _init_files(self, fresh: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.out / "train_config.json")
        path = self.out / "metrics.jsonl"
        keep = []
        if not fresh and path.is_file():  # drop lines logged after the checkpoint we resume from
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def _restore(self, path: Path, files: dict) -> None:
        st = files["state"]
        saved = TrainConfig(**{**st["config"], "betas": tuple(st["config"]["betas"])})
        changed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNTIME_ONLY
                   and getattr(saved, f.name) != getattr(self.cfg, f.name)]
        if changed and self.main:
            print(f"note: resuming {path} with changed settings {changed}; the run will not match an unbroken one")
        ckpt.load_model_state(self.model, files["model"])
        ckpt.load_optim_state(self.model, self.opt, files["optim"])
        ckpt.set_expert_biases(self.model, st["expert_bias"])
        if objective_parameters(self.objective):
            self.objective.load_state_dict(st["objective"])
        data = st["data"]
        self.data.load_state_dict(data[self.rank] if isinstance(data, list) else data)
        if self.images is not None and "images" in st:
            self.images.load_state_dict(st["images"])
        ckpt.set_rng_state(st["rng"])
        self.step, self.tokens, self.saved_step = st["step"], st["tokens"], st["step"]
        if self.main:
            print(f"resumed from {path} at step {self.step}")

    # -- one optimizer step --
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics (raises TrainingDiverged)."""
        from herd.train import balance

        cfg, model = self.cfg, self.model
        micro = [to_device(next(self.batches), self.device) for _ in range(cfg.grad_accum)]
        if self.step == 0 and "labels" in micro[0] and torch.equal(micro[0]["labels"], micro[0]["input_ids"]):
            raise ValueError("the packer's labels equal its input_ids: labels must be the next tokens (shifted)")
        if self.images is not None:  # one pass of image-text chat rows per micro-batch (module docstring)
            micro += [{k: v.to(self.device) for k, v in next(self.images).items()} for _ in range(cfg.grad_accum)]
        count = [int((b["labels"] != IGNORE).sum()) if "labels" in b else 0 for b in micro]
        n_text, n_img = max(sum(count[:cfg.grad_accum]), 1), max(sum(count[cfg.grad_accum:]), 1)
        w = cfg.image_weight if self.images is not None else 0.0  # the objective: (1 - w) text mean + w image mean
        ce, img_ce, aux, kl = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0.0, 0.0
        alpha = self._alpha() if self.teacher is not None else None
        loads, extra = torch.zeros_like(self.loads), {}
        for i, b in enumerate(micro):
            image = i >= cfg.grad_accum
            with self._autocast():
                if hasattr(self.objective, "outputs"):  # it scores what it computes itself (herd.train.contrastive)
                    logits, router_logits = forward(self.model, b, self.objective), []
                else:
                    logits, router_logits = forward(self.model, b, return_router_logits=True)
            if self.objective is not None:  # its loss replaces the cross-entropy (train's docstring)
                loss, stats = self.objective(logits, b)
                loss = loss / len(micro)
                ce_sum = loss.detach()  # its share of the step's mean: summed below, logged as `loss`
                extra = {k: extra.get(k, 0.0) + v / len(micro) for k, v in stats.items()}
            else:
                ce_sum = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE,
                                         reduction="sum")
                share = w / n_img if image else (1 - w) / n_text  # weight of this batch's summed loss
                loss = ce_sum * share
            if self.teacher is not None and not image:
                loss, kl_part = self._distill(b, logits, share, alpha)
                kl += kl_part / (1 - w)
            if cfg.balance == "aux_loss" and router_logits:
                a = balance.switch_aux_loss(router_logits, self.tcfg.num_experts_per_tok, self.tcfg.num_local_experts)
                loss = loss + cfg.aux_coef * a / len(micro)
                aux += float(a.detach()) / len(micro)
            loss.backward()
            if image:
                img_ce += ce_sum.detach()
            else:
                ce += ce_sum.detach()
            if router_logits:
                with torch.no_grad():
                    loads += balance.expert_loads(model, [r.detach() for r in router_logits]).float()
        if cfg.balance == "aux_free" and len(loads) and "decoder" not in cfg.frozen:  # frozen: it routes as it did
            left = cfg.steps - self.step  # steps left in the plan, this one included
            if left <= round(cfg.bias_cooldown * cfg.steps):  # the cooldown: linearly to exactly zero at the end
                balance.shrink_biases(model, max(left - 1, 0) / max(left, 1))
            else:
                balance.update_biases(model, loads, cfg.bias_rate)  # sums the loads over ranks itself
        loads = _all_sum(loads, self.world)  # for the log: the whole step's tokens
        # text cross-entropy (comparable across runs), or a custom objective's step mean
        loss_val = float(_all_sum(ce / (1 if self.objective is not None else n_text), self.world)) / self.world
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
            self._diverged(loss_val, gnorm)
        factor = lr_factor(self.step, steps=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule,
                           min_ratio=cfg.min_lr / cfg.lr if cfg.lr else 0.0, decay_frac=cfg.decay_frac)
        for g, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += sum(b["input_ids" if "input_ids" in b else "caption_ids"].numel() for b in micro) * self.world
        self.loads += loads
        m = {"loss": loss_val, "lr": cfg.lr * factor, "grad_norm": gnorm, **extra}  # extra: this rank's stats
        if cfg.balance == "aux_loss":
            m["aux"] = aux
        if self.images is not None:
            m["image_loss"] = float(_all_sum(img_ce / n_img, self.world)) / self.world
        if self.teacher is not None:
            m["kl"], m["alpha"] = kl, alpha
        return m

    def _alpha(self) -> float:
        from herd.train.distill import alpha_at

        cfg = self.cfg
        return alpha_at(self.step, cfg.steps, cfg.alpha_schedule, cfg.alpha,
                        cfg.alpha if cfg.alpha_end is None else cfg.alpha_end)

    def _distill(self, b: dict, logits: torch.Tensor, weight: float, alpha: float) -> tuple[torch.Tensor, float]:
        """This micro-batch's part of the distillation objective (its targets x `weight`), and of the mean KL."""
        from herd.train.distill import distill_loss

        with torch.no_grad(), self._autocast():
            t_logits = self.teacher(b["input_ids"], doc_ids=b["doc_ids"])
        loss, info = distill_loss(logits.float(), t_logits.float(), b["labels"], alpha, self.cfg.tau)
        share = int((b["labels"] != IGNORE).sum()) * weight  # distill_loss is a mean over this micro-batch
        return loss * share, float(info["kl"]) * share

    def _diverged(self, loss: float, gnorm: float) -> None:
        good = ckpt.latest(self.ckpt_root)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
        raise TrainingDiverged(f"training diverged at step {self.step + 1}: loss {loss}, grad norm {gnorm}. "
                               f"Stopped before updating the weights; {where}. Resume from it with a lower lr, "
                               f"more warmup or dtype=float32.")

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over every val target, and bits per byte (module docstring) over the text targets."""
        if self.val_batches is None and self.rows is not None:  # the first batches of the held-out rows
            val = self.rows(self.cfg, self.tok, "val", self.rank, self.world)
            self.val_batches = [next(val) for _ in range(self.cfg.eval_batches)]
        if self.val_batches is None:  # the same val batches at every evaluation
            self.val_batches = val_batches(self.cfg, self.tok, self.rank, self.world)
        self.model.eval()
        if self.objective is not None:  # its loss and stats, averaged over this rank's val batches
            out = objective_means(self.model, self.val_batches, self.objective, self.device, self._autocast)
            self.model.train()
            return {"val_bpb": None, **{f"val_{k}": v for k, v in out.items()}}
        table = self.bytes_table if self.cfg.stage == "lm" else None  # align rows are answers, not text
        sums = text_loss_sums(self.model, self.val_batches, table, self.device, self._autocast)
        out = self._evaluate_images() if self.images is not None else {}
        if self.cfg.scene_eval and self.mcfg.vision_config is not None and self.world == 1:
            from herd.train.vision_diagnostics import look_report

            look = look_report(self.model, self.tok, self.mcfg.vision_config, self.cfg.seed, self.cfg.scene_eval,
                               self.cfg.scene_size)
            out |= {f"val_{k}": v for k, v in look.items()}
        self.model.train()
        return {**val_metrics(_all_sum(sums.to(self.device), self.world).tolist()), **out}

    def _evaluate_images(self) -> dict:
        """Mean loss over the answer tokens of fixed held-out image-text chats."""
        if self.val_images is None:
            rows = ImageRows(self.cfg, self.tok, self.mcfg.vision_config, "val", self.rank, self.world)
            self.val_images = [next(rows) for _ in range(self.cfg.eval_batches)]
        sums = text_loss_sums(self.model, self.val_images, None, self.device, self._autocast)
        nats, n = _all_sum(sums[:2].to(self.device), self.world).tolist()
        return {"val_image_loss": nats / max(n, 1)}

    # -- outputs --
    def log(self, rec: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _progress(self, m: dict) -> dict:
        """Throughput, MFU and expert loads over the steps since the last log line; prints the progress line."""
        w, stop = self.window, self.cfg.stop_step
        tok_s = w["tokens"] / max(w["time"], 1e-9)
        mfu = self.fpt * tok_s / self.world / self.peak if self.peak else None
        frac = (self.loads / self.loads.sum(1, keepdim=True).clamp(min=1)).cpu()
        imbalance = float(frac.max(1).values.mean() * frac.shape[1]) if len(frac) else None  # max/mean load
        if self.main:
            eta = (stop - self.step) * w["time"] / max(w["steps"], 1)
            parts = [f"step {self.step:>{len(str(stop))}}/{stop}", f"loss {w['loss'] / max(w['steps'], 1):.4f}",
                     f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"{tok_s / 1e3:.1f}k tok/s"]
            parts += [f"MFU {100 * mfu:.1f}%"] if mfu is not None else []
            parts += [f"load max/mean {imbalance:.2f}"] if imbalance is not None else []
            print(" | ".join(parts + [f"ETA {_clock(eta)}"]), flush=True)
        self.loads.zero_()
        self.window = {"time": 0.0, "tokens": 0, "steps": 0, "loss": 0.0}
        return {"tok_s": tok_s, "mfu": mfu, "load_max_over_mean": imbalance, "expert_load": frac.tolist()}

    def _eval(self) -> None:
        self.last_val = self.evaluate()
        self.log({"kind": "eval", "step": self.step, **self.last_val})
        if self.main:
            bpb = self.last_val["val_bpb"]
            img = self.last_val.get("val_image_loss")
            shown = ("val_loss", "val_bpb", "val_image_loss")
            more = [f"{k[4:]} {v:.4g}" for k, v in self.last_val.items() if k not in shown and isinstance(v, float)]
            print(f"eval step {self.step}: val loss {self.last_val['val_loss']:.4f}"
                  + (f", {bpb:.4f} bits/byte" if bpb is not None else "")
                  + (f", image answers {img:.4f}" if img is not None else "")
                  + (f" | {', '.join(more)}" if more else ""), flush=True)

    def save(self) -> None:
        data = self.data.state_dict()
        if self.world > 1:  # each rank reads its own shard of the data
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, data)
            data = gathered
        own = objective_parameters(self.objective)  # a contrastive loss's scale and bias
        files = {"model": ckpt.model_state(self.model), "optim": ckpt.optim_state(self.model, self.opt),
                 "state": {"step": self.step, "tokens": self.tokens, "data": data, "rng": ckpt.rng_state(),
                           **({"images": self.images.state_dict()} if self.images is not None else {}),
                           **({"objective": self.objective.state_dict()} if own else {}),
                           "expert_bias": ckpt.expert_biases(self.model), "config": self.cfg.to_dict(),
                           "model_config": dataclasses.asdict(self.mcfg),
                           "schedule": {"kind": self.cfg.schedule, "lr": self.opt.param_groups[0]["lr"]}}}
        if self.main:
            ckpt.save(self.ckpt_root, self.step, files, self.cfg.keep_last)
        if self.world > 1:
            torch.distributed.barrier()
        self.saved_step = self.step

    def export(self) -> Path:
        """out_dir/hf: the run's model in the Hugging Face format with the tokenizer (herd.formats.hf). A model that
        still routes with biases is exported with them, and what reading it without them changes is measured."""
        from herd.formats import hf as hf_format
        from herd.train.balance import routing_without_biases

        sd, out = ckpt.model_state(self.model), self.out / "hf"
        if self.main:
            model = ckpt.plain_model(sd, ckpt.expert_biases(self.model), self.mcfg)
            with warnings.catch_warnings():  # said below, with figures
                warnings.simplefilter("ignore", hf_format.RoutingWarning)
                hf_format.export(model, self.tok, out)
            if routers := hf_format.biased(model):
                b = (self.val_batches or [next(iter(self.batches))])[0]
                change = routing_without_biases(model, b["input_ids"], b["doc_ids"], b.get("pixel_values"))
                self.log({"kind": "export", "step": self.step, "biased_routers": len(routers), **change})
                print(f"WARNING: {out} routes with non-zero MoE selection biases ({len(routers)} routers): the run "
                      f"stopped before its bias cooldown ended, or bias_cooldown=0. herd loads them; transformers and "
                      f"vLLM ignore them, which changes {100 * change['routing_changed']:.1f}% of the expert choices "
                      f"on a validation batch and the logits by up to {change['max_logit_change']:.3g}.", flush=True)
        return out

    # -- the loop --
    def fit(self) -> dict:
        cfg, stop, t_start = self.cfg, self.cfg.stop_step, time.perf_counter()
        if self.step == 0 and stop > 0:
            self._eval()
        while self.step < stop:
            t0, tokens_before = time.perf_counter(), self.tokens
            m = self.train_step()
            w = self.window
            w["time"] += time.perf_counter() - t0
            w["steps"], w["loss"] = w["steps"] + 1, w["loss"] + m["loss"]
            w["tokens"] += self.tokens - tokens_before
            rec = {"kind": "train", "step": self.step, **m, "tokens": self.tokens}  # every step: exact loss curves
            if self.step % cfg.log_every == 0 or self.step == stop:
                rec |= self._progress(m)
            self.log(rec)
            if self.step % cfg.eval_every == 0 or self.step == stop:
                self._eval()
            if self.step % cfg.ckpt_every == 0 or self.step == stop:
                self.save()
        if self.saved_step != self.step:
            self.save()
        hf = self.export() if cfg.export else None
        if cfg.plots and self.main:
            from herd.train.plots import plot_run

            plot_run(self.out)
        if cfg.samples and self.main and self.world == 1:  # a sharded model would need every rank to generate
            from herd.train.samples import print_samples

            acc = print_samples(self.model, self.tok, self.mcfg, cfg.seed, self.out, cfg.scene_size)
            if acc:
                self.log({"kind": "samples", "step": self.step, **acc})
                self.last_val = {**self.last_val, **acc}
        return {"step": self.step, "tokens": self.tokens, "time_s": time.perf_counter() - t_start,
                "out_dir": str(self.out), "checkpoint": str(ckpt.latest(self.ckpt_root)),
                "hf": str(hf) if hf else None, **self.last_val}
