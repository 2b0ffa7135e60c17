"""The training run's typed config: one dataclass, named presets, files and `key=value` overrides.

Design (style.md lessons 3-4; nanoGPT's configurator, typed): a run is a `TrainConfig`; a variant is
`train_preset("tiny").replace(lr=1e-3)`. Files (JSON or TOML) and command-line `key=value` items are a thin layer
on top: every key must be a field (unknown keys fail with a did-you-mean), every value is converted to the field's
declared type or fails naming the key, and `__post_init__` checks the invariants the trainer relies on.

Model shape comes from a herd preset (`model`) plus `model_overrides` (TextConfig fields; `model.hidden_size=128` on
the command line), or from `init`, a checkpoint to start from (a training run's directory or a Hugging Face one).

`steps` is the planned length of the run (the LR schedule is laid out over it); `max_steps` only says where this
invocation stops, so a run stopped at k and resumed to `steps` follows the same schedule as one never stopped.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from herd.config import PRESETS, ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16")
BALANCE = ("aux_free", "aux_loss", "none")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(kw_only=True)
class TrainConfig:
    # --- model and data ---
    model: str = "tiny"  # herd preset name (herd.config.PRESETS); ignored when `init` is set
    model_overrides: dict = field(default_factory=dict)  # TextConfig fields changed from the preset
    init: str | None = None  # start from these weights: a training out_dir / step dir, or a Hugging Face dir
    tokenizer: str = "tiny"  # "tiny" (shipped with herd) or a directory holding tokenizer.json
    data: str = "builtin"  # sources joined by "+": builtin (the corpus), passkey, kv, or .txt / .jsonl paths
    seq_len: int = 64
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_doc_chars: int = 8192  # longer documents are cut into pieces at paragraph breaks (herd.train.inputs); 0: never
    image_rows: int = 0  # image-text chat rows per micro-batch (herd.train.inputs); > 0 trains the multimodal model
    image_weight: float = 0.3  # share of the objective that is the image-text answers' mean loss (herd.train.trainer)
    image_data: str = "scenes"  # "scenes" (synthetic shape scenes, herd.data.synthetic) or an image-text .jsonl
    image_seq_len: int = 128  # longest image-text chat row, image tokens included
    scene_task: str = "mixed"  # caption | qa | ground | mixed (one of the three per chat) | all (herd.data.synthetic)
    scene_size: int = 56  # side of the synthetic scenes in pixels (tiny's 28-pixel tiles: a 2x2 grid + global)
    # --- vision stages (herd.train.vision_stages) ---
    stage: str = "lm"  # lm (next-token: text rows + image_rows) | contrastive | align (image chats only)
    vision: str | None = None  # give a text-only init a fresh vision tower of this preset (herd.config.VISION_PRESETS)
    freeze: str = ""  # parts that do not train, joined by ",": decoder, tower, adapter, projector
    contrastive_loss: str = "sigmoid"  # sigmoid (SigLIP) | softmax (CLIP); herd.train.contrastive
    contrastive_text: str = "embeddings"  # caption side: the frozen decoder's input embeddings | hidden (final states)
    contrastive_pool: str = "mean"  # mean: pooled image vs pooled caption | tokens: caption tokens vs image tokens
    scene_eval: int = 0  # held-out scene questions asked with the right and another image at every eval (0: off)
    steps: int = 600  # planned run length: the LR schedule spans it
    max_steps: int | None = None  # stop this invocation after this step (None: `steps`)
    # --- optimizer (AdamW) and schedule ---
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: share of the steps spent in the final linear decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices and embeddings only; norms are never decayed
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    dtype: str = "float32"  # float32, or bfloat16 autocast (weights and optimizer stay float32)
    device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:1 ...
    seed: int = 0
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    peak_flops: float | None = None  # FLOP/s one device can do, for MFU; None: measured/published defaults
    # --- MoE load balancing ---
    balance: str = "aux_free"  # aux_free (bias update, arXiv:2408.15664) | aux_loss (Switch) | none
    bias_rate: float = 1e-3  # aux_free: bias step per optimizer step
    # aux_free: share of the planned steps at the end over which the biases decay to zero, so the final model routes
    # without them and its Hugging Face export is read the same by every engine (herd.formats.hf); 0 keeps them
    bias_cooldown: float = 0.2
    aux_coef: float = 1e-3  # aux_loss: weight of the Switch loss (transformers' router_aux_loss_coef)
    # --- MetaP, FP8 ---
    metap: bool = False
    base_width: int = 64  # MetaP: width and depth the LR was tuned at
    base_depth: int = 4
    fp8: bool = False
    # --- distillation (a frozen teacher on the same batch) ---
    teacher: str | None = None
    alpha: float = 0.5  # weight of the KL term at the start
    alpha_end: float | None = None  # at the end (None: constant alpha)
    alpha_schedule: str = "constant"  # constant | linear | cosine
    tau: float = 1.0
    # --- SFT (herd.post.sft: `herd sft`; these are read only there) ---
    sft_data: str | None = None  # a conversations .jsonl (OpenAI `messages`), tasks:NAME[,NAME...][@D|@LO-HI],
    # scenes:TASK, or several joined by + (herd.post.sft_data)
    sft_examples: int = 1000  # tasks: examples drawn per task from its train split
    prune_easy: float = 0.0  # share of the examples the judge finds easiest (lowest answer loss) dropped before SFT
    judge: str | None = None  # the judge model for prune_easy (None: `init`, the model being tuned)
    # --- DPO (herd.post.dpo: `herd dpo`; read only there) ---
    dpo_pairs: str | None = None  # a .jsonl of {"messages", "chosen", "rejected"} preference pairs
    beta: float = 0.1  # DPO's beta (TRL's default): how far the policy may move from the reference
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped preference labels, in [0, 0.5)
    # pairs built from rollouts (herd.post.dpo_pairs) instead of a file: an RL run's rollouts.jsonl, or
    # tasks:NAME[,NAME...][@D|@LO-HI] to sample the `init` policy's own (group_size answers per prompt)
    dpo_rollouts: str | None = None
    prefer: str = "correct"  # how a pair is chosen from a group: correct (right over wrong) | shorter (of two right)
    # --- RL (herd.post.rl: `herd rl`; read only there and by dpo_rollouts) ---
    rl_tasks: str = "arithmetic"  # task names joined by ",", each with an optional @MAX difficulty (arithmetic@3)
    group_size: int = 8  # answers sampled per prompt (GRPO's G); batch_size counts prompts per micro-batch
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 64  # longest answer sampled
    eps_low: float = 0.2  # clip range of the ratio: [1 - eps_low, 1 + eps_high] (DAPO's clip-higher)
    eps_high: float = 0.28
    kl_coef: float = 0.0  # k3 KL to the init model (0: none, as in DAPO)
    loss_norm: str = "token"  # token (DAPO) | sequence (GRPO)
    adv_scale: str = "std"  # std (GRPO) | none (Dr. GRPO)
    format_reward: float = 0.0  # added to the verifier's reward when the answer has the expected form
    overlong_penalty: float = 0.0  # DAPO's soft overlong punishment: up to this much off an answer near the limit
    filter_groups: bool = True  # drop groups with all-equal rewards and sample more prompts (DAPO dynamic sampling)
    max_rounds: int = 4  # sampling rounds per step to fill the batch with informative groups
    refilter_every: int = 10  # re-score the prompt pool with the current policy every N steps (0: never)
    pool_size: int = 64  # prompts per task in the pool
    pool_k: int = 4  # samples per prompt when the pool is re-scored (pass@k)
    keep_pass: float = 0.75  # pool prompts the policy solves more often than this are dropped as easy
    curriculum: bool = True  # raise a task's difficulty once the policy's accuracy on it reaches promote_at
    promote_at: float = 0.6
    system_prompts: bool = True  # give each prompt a system prompt drawn from a varied pool
    rl_async: bool = False  # generate the next batches while learning (herd.post.rl_async)
    max_staleness: int = 1  # async: the most optimizer steps a batch's generating weights may lag behind
    generator: str = "engine"  # engine (herd's, in-process or in a child process) | http://HOST:PORT (a server)
    push_dir: str | None = None  # a remote generator's --weights-dir, where the learner writes the weights it pushes
    push_every: int = 1  # push the learner's weights to the generator every N steps
    is_correction: bool = True  # weight tokens by the truncated ratio of learner to generator probabilities
    max_is_ratio: float = 2.0
    rl_eval_prompts: int = 32  # held-out prompts per task in each evaluation (pass@1, mean reward)
    # --- outputs ---
    out_dir: str = "runs/tiny"
    export: bool = True  # write out_dir/hf (Hugging Face format + tokenizer) when the run ends
    plots: bool = True
    samples: bool = True  # print greedy samples (text; answers about scenes for a multimodal run) at the end

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.balance in BALANCE, f"balance must be one of {BALANCE}, got {self.balance!r}"),
            (self.alpha_schedule in ALPHA_SCHEDULES,
             f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {self.alpha_schedule!r}"),
            (min(self.seq_len, self.batch_size, self.grad_accum, self.steps) > 0,
             "seq_len, batch_size, grad_accum and steps must be positive"),
            (self.max_steps is None or self.max_steps >= 0, "max_steps must be >= 0"),
            (0 <= self.warmup <= self.steps, f"warmup ({self.warmup}) must be within 0..steps ({self.steps})"),
            (0 <= self.min_lr <= self.lr, f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})"),
            (0 < self.decay_frac <= 1, "decay_frac must be in (0, 1]"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (min(self.eval_every, self.eval_batches, self.ckpt_every, self.keep_last, self.log_every) > 0,
             "eval_every, eval_batches, ckpt_every, keep_last and log_every must be positive"),
            (0 <= self.alpha <= 1 and (self.alpha_end is None or 0 <= self.alpha_end <= 1), "alpha must be in [0, 1]"),
            (self.tau > 0, "tau must be > 0"),
            (self.max_doc_chars >= 0, "max_doc_chars must be >= 0"),
            (0 < self.image_weight < 1, "image_weight must be in (0, 1)"),
            (self.stage in ("lm", "contrastive", "align"),
             f"stage must be lm, contrastive or align, got {self.stage!r}"),
            (all(p in ("decoder", "tower", "adapter", "projector") for p in self.frozen),
             f"freeze takes decoder, tower, adapter, projector joined by ',', got {self.freeze!r}"),
            (self.contrastive_loss in ("sigmoid", "softmax") and self.contrastive_text in ("embeddings", "hidden")
             and self.contrastive_pool in ("mean", "tokens"),
             f"contrastive_loss must be sigmoid or softmax, contrastive_text embeddings or hidden and contrastive_pool "
             f"mean or tokens, got {self.contrastive_loss!r}, {self.contrastive_text!r}, {self.contrastive_pool!r}"),
            (self.scene_eval >= 0, "scene_eval must be >= 0"),
            (0 <= self.bias_cooldown <= 1, "bias_cooldown must be in [0, 1]"),
            (self.scene_task in ("caption", "qa", "ground", "mixed", "all"),
             f"scene_task must be caption, qa, ground, mixed or all, got {self.scene_task!r}"),
            (self.image_rows >= 0 and self.image_seq_len > 0 and self.scene_size >= 8,
             "image_rows must be >= 0, image_seq_len > 0 and scene_size >= 8"),
            (self.grad_clip >= 0 and self.weight_decay >= 0, "grad_clip and weight_decay must be >= 0"),
            (0 <= self.prune_easy < 1 and self.sft_examples > 0, "prune_easy must be in [0, 1), sft_examples > 0"),
            (self.beta > 0 and 0 <= self.label_smoothing < 0.5, "beta must be > 0 and label_smoothing in [0, 0.5)"),
            (self.prefer in ("correct", "shorter"), f"prefer must be correct or shorter, got {self.prefer!r}"),
            (self.group_size >= 2, f"group_size must be >= 2 (advantages compare answers to one prompt), got "
                                   f"{self.group_size}"),
            (self.temperature > 0 and self.max_new_tokens > 0, "temperature and max_new_tokens must be > 0"),
            (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.kl_coef >= 0,
             "need 0 <= eps_low < 1, eps_high >= 0 and kl_coef >= 0"),
            (self.loss_norm in ("token", "sequence"), f"loss_norm must be token or sequence, got {self.loss_norm!r}"),
            (self.adv_scale in ("std", "none"), f"adv_scale must be std or none, got {self.adv_scale!r}"),
            (min(self.max_rounds, self.pool_size, self.pool_k, self.rl_eval_prompts) > 0 and self.refilter_every >= 0,
             "max_rounds, pool_size, pool_k and rl_eval_prompts must be positive, refilter_every >= 0"),
            (0 < self.keep_pass <= 1 and 0 < self.promote_at <= 1, "keep_pass and promote_at must be in (0, 1]"),
            (self.max_staleness >= 0 and self.max_is_ratio >= 1 and self.push_every > 0,
             "max_staleness must be >= 0, max_is_ratio >= 1 and push_every > 0"),
            (self.generator == "engine" or self.generator.startswith(("http://", "https://")),
             f"generator must be engine or a server's http(s)://HOST:PORT, got {self.generator!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        self.model_overrides = _model_overrides(self.model_overrides)
        if self.init is None and self.model not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose one of {sorted(PRESETS)}")

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (also what a training checkpoint stores)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parts `freeze` names; the contrastive stage always freezes the decoder (its text side)."""
        names = tuple(p.strip() for p in self.freeze.split(",") if p.strip())
        return names + ("decoder",) if self.stage == "contrastive" and "decoder" not in names else names

    @property
    def stop_step(self) -> int:
        return self.steps if self.max_steps is None else self.max_steps


# Named runs at tiny scale. "tiny" trains the tiny preset on the built-in corpus in a few minutes on 2 CPU cores;
# "smoke" is seconds (tests, CI); "tiny-midtrain" continues a tiny run at 4x the context.
TRAIN_PRESETS: dict[str, dict] = {
    # bias_rate 1e-2, not torchtitan's 1e-3: runs of hundreds of steps need the faster pull (on tiny, 300 steps end
    # at max/mean expert load 1.2 with 1e-2 vs 1.8 with 1e-3, at the same validation loss)
    "tiny": dict(bias_rate=1e-2),
    "tiny-maverick": dict(model="tiny-maverick", bias_rate=1e-2),
    # the tiny preset with 4 image-text chat rows (synthetic scenes) per step: the multimodal model learns to look
    "tiny-multimodal": dict(bias_rate=1e-2, image_rows=4, out_dir="runs/tiny-multimodal"),
    # the vision stages (herd.train.vision_stages), from a text checkpoint: init=DIR (vision=tiny adds the tower)
    "vision-contrastive": dict(stage="contrastive", vision="tiny", batch_size=64, steps=1500, warmup=50, lr=3e-3,
                               min_lr=3e-4, weight_decay=0.0, eval_every=250, eval_batches=2, ckpt_every=500,
                               samples=False, out_dir="runs/vision-contrastive"),
    # align: the adapter and projector only by default; training the tower too against the frozen tiny base collapsed
    # it (image features' spread across scenes 0.95 -> 0.05 in 300 steps: experiments/vision_stages.py)
    "vision-align": dict(stage="align", freeze="decoder,tower", batch_size=16, steps=400, warmup=20, lr=2e-3,
                         min_lr=2e-4, weight_decay=0.0, scene_task="qa", eval_every=100, eval_batches=2, ckpt_every=200,
                         scene_eval=100, out_dir="runs/vision-align"),
    "smoke": dict(bias_rate=1e-2, samples=False, seq_len=32, batch_size=4, steps=12, warmup=2, eval_every=6,
                  eval_batches=2, ckpt_every=6, log_every=2, out_dir="runs/smoke"),
    # supervised fine-tuning of a checkpoint on chats (herd.post.sft): lower LR, whole conversations per row
    "sft": dict(bias_rate=1e-2, samples=False, seq_len=256, batch_size=8, steps=200, warmup=10, lr=5e-4, min_lr=5e-5,
                eval_every=50, eval_batches=2, ckpt_every=100, out_dir="runs/sft"),
    # light DPO on preference pairs (herd.post.dpo): batch_size counts pairs (two rows each). TRL's lr 5e-7 suits
    # billion-parameter models, whose updates are large per unit of LR; on the tiny preset it leaves the DPO loss at
    # about log 2 after 50 steps. 5e-5 (a tenth of the SFT preset's) moves it clearly while the policy stays near
    # its reference (a short LR sweep on arithmetic pairs): DPO stays "light".
    "dpo": dict(bias_rate=1e-2, samples=False, seq_len=256, batch_size=4, steps=50, warmup=5, lr=5e-5, min_lr=5e-6,
                eval_every=10, eval_batches=2, ckpt_every=25, out_dir="runs/dpo"),
    # online RL on verifiable tasks (herd.post.rl): batch_size prompts x group_size answers per micro-batch. No MoE
    # bias updates: the generator must route as the learner does at every push, and an engine that ignores the
    # biases (vLLM) would not; the init model's routing (after its own cooldown) is kept
    # lr: on the tiny preset 5e-5 left the rollouts' reward flat over 60 steps and 1e-3 raised it (0.54 -> 0.72 on
    # counting after SFT); billion-parameter runs use ~1e-6 (DAPO)
    "rl": dict(balance="none", samples=False, seq_len=512, batch_size=8, steps=60, warmup=0, lr=1e-3, min_lr=1e-3,
               schedule="constant", weight_decay=0.0, eval_every=20, ckpt_every=20, log_every=1, out_dir="runs/rl"),
    "tiny-midtrain": dict(bias_rate=1e-2, seq_len=256, batch_size=4, steps=200, warmup=10, lr=1e-3, min_lr=1e-4,
                          data="builtin+passkey+kv", eval_every=50, ckpt_every=100, out_dir="runs/tiny-midtrain"),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return from_dict({**TRAIN_PRESETS[name], **overrides})


# ---- files and key=value overrides ---------------------------------------------------------------------------------
def load_file(path: str | Path) -> dict:
    """The raw dict of a .json or .toml config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are both ValueErrors
        raise ConfigError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e


def from_dict(d: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A config from a dict of field values (typed and checked). A "preset" key picks the base preset."""
    d = dict(d)
    if "preset" in d:
        base = train_preset(d.pop("preset"))
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for key, v in d.items():
        _known(key, hints, "training config")
        values[key] = _coerce(key, hints[key], v)
    if base is None:
        return TrainConfig(**values)
    if "model_overrides" in values:  # a file's [model_overrides] table adds to the base's, key by key
        values["model_overrides"] = {**base.model_overrides, **values["model_overrides"]}
    return base.replace(**values)


def with_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """Apply `key=value` strings (`--key=value` also accepted; `model.KEY=value` changes a model field)."""
    values, model = {}, {}
    for item in items:
        key, sep, v = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        if key.startswith("model."):
            model[key.removeprefix("model.")] = _parse_literal(v)
        else:
            values[key] = v
    if model:
        values["model_overrides"] = {**cfg.model_overrides, **model}
    return from_dict(values, base=cfg)


def _known(key: str, hints: dict, what: str) -> None:
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(hints))}"
        raise ConfigError(f"unknown {what} key {key!r}{hint}")


def _parse_literal(v: str):
    """A model override given as text: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(v)
    except ValueError:
        return v


def _coerce(key: str, tp, v):
    """v (a string from the command line, or a JSON/TOML value) as type tp, or a ConfigError naming the key."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `X | None`
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "")):
            return None
        return _coerce(key, next(a for a in args if a is not type(None)), v)
    try:
        if tp is bool:
            if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return v.lower() in ("1", "true", "yes", "on")
            if isinstance(v, bool):
                return v
        elif tp is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, str) or (isinstance(v, float) and v.is_integer()):
                return int(float(v)) if isinstance(v, str) and "e" in v.lower() else int(v)
        elif tp is float:
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                return float(v)
        elif tp is str:
            if isinstance(v, str):
                return v
        elif typing.get_origin(tp) is tuple:
            parts = v.split(",") if isinstance(v, str) else list(v)
            if len(parts) == len(args):
                return tuple(_coerce(key, a, p) for a, p in zip(args, parts, strict=True))
        elif tp is dict or typing.get_origin(tp) is dict:
            if isinstance(v, str):
                v = json.loads(v)
            if isinstance(v, dict):
                return v
    except (ValueError, TypeError):
        pass
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {v!r}")


def _model_overrides(d: dict) -> dict:
    """Check model overrides against TextConfig's fields and types (values are JSON-like already)."""
    from herd.config import TextConfig

    hints = typing.get_type_hints(TextConfig)
    out = {}
    for k, v in d.items():
        _known(k, hints, "model")
        tp = hints[k]
        simple = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        # scalar fields are type-checked here; structured ones (lists, dicts) are checked by TextConfig itself
        out[k] = _coerce(f"model.{k}", tp, v) if len(simple) == 1 and simple[0] in (int, float, bool, str) else v
    return out
