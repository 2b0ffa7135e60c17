"""Online RL with verifiable rewards: `rl(cfg)` runs herd's trainer on rollouts of the policy being trained.

    herd rl --init runs/sft/hf --tasks arithmetic@3,sorting --out runs/rl [group_size=8 key=value ...]
    herd rl --resume runs/rl

One step (GRPO, DeepSeekMath arXiv:2402.03300, with DAPO's changes, arXiv:2503.14476):
1. prompts from the pool (herd.post.rl_pool: medium-to-hard prompts re-filtered by the policy, a curriculum,
   tasks in turn, varied system prompts); `group_size` answers each from the generator (herd.post.rollouts: herd's
   engine on the learner's own weights, or in a child process, or a remote server), scored by the task's verifier
   plus the shaping rewards (`rewards`);
2. zero-advantage filtering (`filter_groups`, DAPO's dynamic sampling, Llama 4's "zero-advantage filtering"):
   groups whose rewards are all equal carry no signal and are dropped; more prompts are sampled, up to
   `max_rounds` rounds, until `batch_size x grad_accum` informative groups fill the step. A step still short is
   padded with dropped groups whose tokens carry no loss (they change nothing), and `groups_short` says so;
3. group-relative advantages, one per answer (herd.post.rl_loss.group_advantages);
4. one optimizer step of the clipped surrogate (herd.post.rl_loss.policy_loss: clip-higher, token-level
   normalisation over the whole step, optional k3 KL to the init model, the truncated importance weight of the
   learner's over the generator's probabilities) through herd's trainer (herd.train.trainer: `rows` are the
   rollouts, `objective` the surrogate), so the LR schedule, clipping, checkpoints, metrics.jsonl and the Hugging
   Face export are the pretraining run's own. One update per batch (TRL's num_iterations=1): pi_old is the policy
   that computes the loss, so the ratio is 1 at the update and the clip acts only through stale rollouts.

Asynchronous mode (`rl_async`, herd.post.rl_sources): a thread keeps the generator (a child process with herd's
engine, or a remote server) producing the next batches while the learner trains; the learner publishes its weights
every `push_every` steps, and a batch may start only once the weights at most `max_staleness` steps old exist.
`staleness` (learner step - generating version) is logged per step; the importance weight corrects for it. With
max_staleness=0 the generator waits for each step's weights: the same update as synchronous mode (tested).

Logged per step in metrics.jsonl (besides the trainer's loss, lr, grad_norm): reward_mean, pass_rate (share of
answers the verifier accepts), frac_reward_zero_std (share of sampled groups with all-equal rewards, TRL's name),
answer_len, rounds, groups_short, staleness, rollout_tokens (cumulative, pool scoring included), the surrogate's
clip fractions, ratio and importance-weight means, the pool's levels and pass rates when it is re-scored. Every
group sampled goes to out/rollouts.jsonl (prompt, answers, rewards, whether it trained), which `herd dpo
--from-rollouts` reads. Evaluations report held-out greedy accuracy per task (`val_pass@1`, temperature 0, over
`rl_eval_prompts` prompts at each difficulty up to the task's cap).

Exact resume: the pool's state and the rollout counters are saved with every checkpoint, and request seeds depend
on (seed, step, round, problem) only, so a synchronous run resumed from step k samples the same rollouts and ends
with the same weights as one never stopped. An asynchronous run regenerates the batches it had queued, with the
weights it resumes from.
"""

from __future__ import annotations

import json
import os

import torch

from herd.config import ConfigError
from herd.post.rl_loss import policy_loss, token_logprobs
from herd.post.rl_pool import PromptPool
from herd.post.rl_sources import Batch, default_rewards, make_source
from herd.post.sft_data import pad_id, with_init_tokenizer
from herd.train.inputs import IGNORE
from herd.train.trainer import Run

ROLLOUTS_FILE = "rollouts.jsonl"


# ---- rows: rollouts -> micro-batches ---------------------------------------------------------------------------------
def micro_batches(batch: Batch, cfg, pad: int, ref_model=None) -> list[dict]:
    """The step's `grad_accum` micro-batches: one row per answer (prompt + answer, right-padded), labels on the
    answer tokens of training groups, each answer's advantage, the generator's log-probs aligned with the labels,
    and `denom` (the step's token or answer count / grad_accum, so the trainer's mean over micro-batches is the
    step's token-level mean)."""
    from herd.post.rl_loss import group_advantages

    rows = []
    for gi, (s, r) in enumerate(batch.groups):
        train = gi < batch.n_train
        adv = group_advantages(torch.tensor([r], dtype=torch.float64), scale=cfg.adv_scale)[0].tolist()
        for ids, lps, a in zip(s.output_ids, s.logprobs, adv, strict=True):
            full, start = s.prompt_ids + ids, len(s.prompt_ids) - 1
            labels = [IGNORE] * start + (ids if train else [IGNORE] * len(ids))
            behaviour = [0.0] * start + lps
            rows.append((full[:-1], labels, behaviour, a if train else 0.0, s.pixel_values))
    n_tok = sum(sum(y != IGNORE for y in row[1]) for row in rows)
    n_seq = sum(any(y != IGNORE for y in row[1]) for row in rows)
    denom = max(n_tok if cfg.loss_norm == "token" else n_seq, 1) / cfg.grad_accum
    stats = {f"stat_{k}": torch.tensor(float(v)) for k, v in batch.stats.items()}
    out = []
    for m in range(cfg.grad_accum):
        part = rows[m::cfg.grad_accum]
        T = max(len(x[0]) for x in part)
        b = {"input_ids": torch.tensor([x[0] + [pad] * (T - len(x[0])) for x in part]),
             "labels": torch.tensor([x[1] + [IGNORE] * (T - len(x[1])) for x in part]),
             "doc_ids": torch.tensor([[0] * len(x[0]) + [-1] * (T - len(x[0])) for x in part]),
             "behaviour": torch.tensor([x[2] + [0.0] * (T - len(x[2])) for x in part]),
             "advantages": torch.tensor([x[3] for x in part], dtype=torch.float32),
             "denom": torch.tensor(float(denom)), **stats}
        pixels = [x[4] for x in part if x[4] is not None]
        if pixels:
            b["pixel_values"] = torch.cat(pixels)
        if ref_model is not None:
            with torch.no_grad():
                logits = ref_model(b["input_ids"], doc_ids=b["doc_ids"], **({"pixel_values": b["pixel_values"]}
                                                                           if pixels else {}))
                b["ref_logprobs"] = token_logprobs(logits, b["labels"])
        out.append(b)
    return out


def rl_objective(cfg):
    """The trainer's `objective`: the clipped surrogate on one micro-batch, and the step's rollout statistics."""

    def objective(logits: torch.Tensor, b: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lp = token_logprobs(logits, b["labels"])  # (B, T)
        loss, stats = policy_loss(lp, lp.detach(), b["advantages"], b["labels"] != IGNORE, cfg.eps_low,
                                  cfg.eps_high, b.get("ref_logprobs"), cfg.kl_coef, cfg.loss_norm,
                                  b["behaviour"] if cfg.is_correction else None, cfg.max_is_ratio,
                                  denom=float(b["denom"]))
        stats.pop("loss")
        stats |= {k.removeprefix("stat_"): float(v) for k, v in b.items() if k.startswith("stat_")}
        return loss, stats

    return objective


# ---- the stream the trainer reads ------------------------------------------------------------------------------------
class RolloutStream:
    """The trainer's `rows` for RL: each step's micro-batches from fresh rollouts of the run's current model."""

    def __init__(self, run, rewards):
        self.run, self.cfg, self.rewards = run, run.cfg, rewards
        self.pool = PromptPool(self.cfg)
        self.pending: list[dict] = []
        self.rollout_tokens, self.source, self.ref = 0.0, None, None
        self.pool_state = self.pool.state_dict()

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.kl_coef:
            from herd.train.snapshots import load_model

            self.ref = load_model(cfg.init)[0].to(self.run.device).eval().requires_grad_(False)
        self.source = make_source(self.run, self.pool, self.rewards, self._log if self.run.main else None)

    def _log(self, step: int, every: list, version: int) -> None:
        with open(self.run.out / ROLLOUTS_FILE, "a") as f:
            for s, r, informative, rnd in every:
                ex = s.example
                f.write(json.dumps({
                    "step": step, "round": rnd, "task": ex.task, "difficulty": ex.difficulty, "seed": ex.seed,
                    "system": ex.messages[0]["content"] if ex.messages[0].get("role") == "system" else None,
                    "messages": None if s.pixel_values is not None else ex.messages, "tools": ex.tools,
                    "policy_version": version, "trained": informative or not self.cfg.filter_groups,
                    "answers": [{"text": t, "reward": x, "correct": sc.correct, "format_ok": sc.format_ok,
                                 "tokens": n} for t, x, sc, n in zip(s.completions, r, s.scores, s.lengths,
                                                                      strict=True)]}) + "\n")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.pending:
            if self.source is None:
                self._start()
            batch = self.source.get(self.run.step)
            self.rollout_tokens += batch.stats["step_rollout_tokens"]
            batch.stats |= {"rollout_tokens": self.rollout_tokens, "staleness": float(self.run.step - batch.version)}
            self.pool_state = batch.pool_state
            self.pending = micro_batches(batch, self.cfg, pad_id(self.run.tok), self.ref)
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"pool": self.pool_state, "rollout_tokens": self.rollout_tokens}

    def load_state_dict(self, st: dict) -> None:
        self.pool.load_state_dict(st["pool"])
        self.pool_state, self.rollout_tokens = st["pool"], float(st["rollout_tokens"])

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


# ---- the run ---------------------------------------------------------------------------------------------------------
class RLRun(Run):
    """herd's training run with rollouts for rows, the surrogate for objective and held-out accuracy for evaluation."""

    def __init__(self, cfg, resume: bool = False, rewards=None):
        self.reward_terms = rewards or default_rewards(cfg)
        super().__init__(cfg, resume, rows=self._rows, objective=rl_objective(cfg))
        path = self.out / ROLLOUTS_FILE
        if self.main and path.is_file():  # drop groups logged after the checkpoint we resume from
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def _rows(self, cfg, tok, split, rank, world) -> RolloutStream:
        self.stream = RolloutStream(self, self.reward_terms)
        return self.stream

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out greedy accuracy per task, at every difficulty up to the task's cap."""
        from herd.post.evaluate import evaluate

        out, total, n = {}, 0.0, 0
        for name, cap in self.stream.pool.caps.items():
            res = evaluate(self.model, self.tok, {name: self.stream.pool.tasks[name]},
                           n_per_task=self.cfg.rl_eval_prompts, difficulties=range(1, cap + 1), k=1,
                           temperature=0.0, max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed,
                           bpb_batches=0)
            t = res["total"]
            out[f"val_pass@1/{name}"] = t["pass@1"]
            out[f"val_format_error_rate/{name}"] = t["format_error_rate"]
            total, n = total + t["pass@1"] * t["prompts"], n + t["prompts"]
        self.model.train()
        return {"val_pass@1": total / max(n, 1), **out}

    def _eval(self) -> None:
        self.last_val = self.evaluate()
        self.log({"kind": "eval", "step": self.step, **self.last_val})
        if self.main:
            v = self.last_val
            per = ", ".join(f"{k.split('/')[1]} {x:.3f}" for k, x in v.items() if k.startswith("val_pass@1/"))
            print(f"eval step {self.step}: held-out greedy pass@1 {v['val_pass@1']:.3f} ({per})", flush=True)

    def fit(self) -> dict:
        try:
            out = super().fit()
        finally:
            self.stream.close()
        return {**out, "rollout_tokens": self.stream.rollout_tokens}


def rl(cfg, resume: bool = False, rewards=None) -> dict:
    """Train `cfg.init` by online RL on `cfg.rl_tasks` (or continue the run in cfg.out_dir); the trainer's summary
    plus `rollout_tokens`. `rewards`: reward terms replacing default_rewards(cfg)."""
    if cfg.init is None and not resume:
        raise ConfigError("RL tunes a model: give init=DIR (herd rl --init DIR), e.g. an SFT run's hf folder")
    if cfg.image_rows or cfg.teacher:
        raise ConfigError("herd rl takes its rows from rollouts: set image_rows=0 and teacher=None")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("herd rl runs in one process for now (the generator and learner share it); run it "
                          "without torchrun, or point generator= at a server for more rollout throughput")
    if cfg.rl_async and cfg.max_staleness < cfg.push_every - 1:
        raise ConfigError(f"max_staleness={cfg.max_staleness} < push_every - 1 = {cfg.push_every - 1}: batches "
                          "would wait for weights that are never pushed; raise max_staleness or lower push_every")
    if cfg.generator != "engine" and not cfg.push_dir:
        raise ConfigError(f"generator={cfg.generator} needs push_dir=DIR, the folder the server was started with "
                          "(herd serve --weights-dir DIR), so the learner can push its weights")
    cfg = with_init_tokenizer(cfg)  # the checkpoint's own tokenizer
    return RLRun(cfg, resume, rewards).fit()
