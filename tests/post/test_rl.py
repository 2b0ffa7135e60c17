"""Online RL (herd.post.rl, rl_pool, rl_sources, rollouts): rollouts become micro-batches labelled on the answers
with their group's advantage; zero-advantage groups are dropped and refilled; the pool drops easy prompts and the
curriculum promotes; a step split into micro-batches is the one big batch; `herd rl` learns a reward, resumes
exactly, exports a model that loads; async with staleness 0 is sync; a remote server generates like the engine.

Run: .venv/bin/python -m pytest tests/post/test_rl.py -v
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import herd
from herd import tasks as registry
from herd.post.evaluate import Sampled
from herd.post.rl import ROLLOUTS_FILE, micro_batches, rl, rl_objective
from herd.post.rl_loss import group_advantages, policy_loss, token_logprobs
from herd.post.rl_pool import PromptPool, parse_tasks, with_system
from herd.post.rl_sources import Batch, collect
from herd.post.rollouts import EngineGenerator
from herd.tasks.base import Example, Score
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train.inputs import IGNORE
from herd.train.train_config import train_preset

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Vowels:
    """A task an untrained model earns varied rewards on: the reward is the share of vowels in the answer > 0.3
    (a verifier any string can pass or fail), so RL has signal from the first step."""

    name: str = "vowels"
    max_difficulty: int = 3
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        return Example(self.name, seed, difficulty, [{"role": "user", "content": f"Say something ({seed})."}],
                       "aeiou", None)

    def score(self, example: Example, completion: str) -> Score:
        letters = [c for c in completion.lower() if c.isalpha()]
        share = sum(c in "aeiou" for c in letters) / max(len(letters), 1)
        return Score(float(share > 0.3), share > 0.3, bool(letters))


@pytest.fixture
def vowels(monkeypatch):
    monkeypatch.setitem(registry.TASKS, "vowels", Vowels())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random model exported with the tiny tokenizer."""
    from herd.formats.hf import export

    out = tmp_path_factory.mktemp("rl") / "base"
    export(herd.build_model(herd.preset("tiny"), seed=0), tiny_tokenizer(), out)
    return out


def _cfg(base, out, **kw):
    settings = dict(init=str(base), out_dir=str(out), rl_tasks="vowels", batch_size=2, group_size=4, max_new_tokens=8,
                    steps=4, eval_every=100, ckpt_every=2, rl_eval_prompts=2, refilter_every=0, curriculum=False,
                    system_prompts=False, plots=False, lr=1e-3, device="cpu")
    return train_preset("rl", **{**settings, **kw})


def _sampled(prompt, answers, rewards, logprobs=None) -> tuple[Sampled, list[float]]:
    ex = Example("vowels", 0, 1, [{"role": "user", "content": "x"}], "", None)
    lps = logprobs or [[-1.0] * len(a) for a in answers]
    return (Sampled(ex, len(prompt), list(range(len(answers))), ["t"] * len(answers),
                    [Score(r, r > 0, True) for r in rewards], [len(a) for a in answers], [None] * len(answers),
                    answers, lps, None, prompt), rewards)


# ---- rows and loss -------------------------------------------------------------------------------------------------
def test_micro_batches_label_the_answers_with_their_groups_advantage():
    cfg = train_preset("rl", grad_accum=2)
    g1 = _sampled([5, 6, 7], [[10, 11], [12]], [1.0, 0.0], [[-0.5, -0.25], [-2.0]])
    g2 = _sampled([5, 8], [[13, 14, 15], [16]], [0.0, 1.0])
    filler = _sampled([9], [[17], [18]], [0.0, 0.0])
    mbs = micro_batches(Batch([g1, g2, filler], 2, {"reward_mean": 0.5}, 0), cfg, pad=0)
    rows = [(b, i) for b in mbs for i in range(len(b["input_ids"]))]  # rows dealt round-robin: 0, 2, 4 | 1, 3, 5
    order = [0, 2, 4, 1, 3, 5]
    want = [([5, 6, 7, 10], [IGNORE, IGNORE, 10, 11], [0, 0, -0.5, -0.25]), ([5, 6, 7], [IGNORE, IGNORE, 12], None),
            ([5, 8, 13, 14], [IGNORE, 13, 14, 15], None), ([5, 8], [IGNORE, 16], None),
            ([9], [IGNORE], None), ([9], [IGNORE], None)]  # the filler group trains nothing
    adv = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])).flatten().tolist()
    for (b, i), k in zip(rows, order, strict=True):
        ids, labels, beh = want[k]
        n = len(ids)
        assert b["input_ids"][i, :n].tolist() == ids and b["labels"][i, :n].tolist() == labels
        assert (b["labels"][i, n:] == IGNORE).all() and (b["doc_ids"][i, n:] == -1).all()
        assert b["advantages"][i].item() == pytest.approx(adv[k] if k < 4 else 0.0)
        if beh is not None:
            assert b["behaviour"][i, :n].tolist() == beh
    assert all(b["denom"].item() == 7 / 2 for b in mbs)  # the step's 7 answer tokens over 2 micro-batches
    assert all(b["stat_reward_mean"].item() == 0.5 for b in mbs)


def test_a_step_in_micro_batches_is_the_one_big_batch(base):
    model, _ = ckpt.load_model(base)
    groups = [_sampled([3, 4, 5], [[6, 7, 8], [9]], [1.0, 0.0]), _sampled([3, 10], [[11, 12], [13, 14]], [0.0, 1.0]),
              _sampled([3], [[15], [16, 17, 18, 19]], [1.0, 0.0])]
    grads = []
    for accum in (1, 3):
        cfg = train_preset("rl", grad_accum=accum, is_correction=False)
        model.zero_grad()
        for b in micro_batches(Batch(groups, 3, {}, 0), cfg, pad=0):
            loss, _ = rl_objective(cfg)(model(b["input_ids"], doc_ids=b["doc_ids"]), b)
            (loss / accum).backward()  # what the trainer does with a step's micro-batches
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    # at the update the ratio is 1: the loss is -mean(A) over tokens and its gradient the policy gradient
    # -sum_t A_i grad log pi(t) / tokens, written out by hand
    b = micro_batches(Batch(groups, 3, {}, 0), train_preset("rl"), pad=0)[0]
    mask, A = b["labels"] != IGNORE, b["advantages"][:, None]
    grad = []
    for hand in (False, True):
        model.zero_grad()
        lp = token_logprobs(model(b["input_ids"], doc_ids=b["doc_ids"]), b["labels"])
        loss = -(A * lp * mask).sum() / mask.sum() if hand else policy_loss(lp, lp.detach(), b["advantages"], mask)[0]
        if not hand:
            assert torch.allclose(loss, -(A * mask).sum() / mask.sum())
        loss.backward()
        grad.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grad[0], grad[1], atol=1e-6)


class FakeGenerator:
    """Answers with fixed rewards: prompt seed s gets rewards pattern[s % len(pattern)]."""

    version = 0

    def __init__(self, pattern):
        self.pattern, self.calls = pattern, []

    def generate(self, tasks, examples, k, temperature, max_new_tokens, seed):
        self.calls.append([ex.seed for ex in examples])
        out = []
        for ex in examples:
            r = self.pattern[ex.seed % len(self.pattern)][:k]
            s, _ = _sampled([1, 2], [[3]] * k, r)
            out.append(Sampled(ex, *list(vars(s).values())[1:]))
        return out


def test_zero_advantage_groups_are_dropped_and_the_batch_refilled(vowels):
    cfg = train_preset("rl", rl_tasks="vowels", batch_size=3, group_size=2, refilter_every=0, curriculum=False,
                       system_prompts=False)
    gen = FakeGenerator([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # seeds 0, 3, 6 ... informative
    batch = collect(PromptPool(cfg), gen, cfg, 0, [lambda ex, t, s, n: s.reward])
    assert [len(c) for c in gen.calls] == [3, 2, 1, 1]  # refilled until three informative groups
    assert [s.example.seed % 3 for s, _ in batch.groups] == [0, 0, 0] and batch.n_train == 3
    assert batch.stats["frac_reward_zero_std"] == pytest.approx(4 / 7) and batch.stats["rounds"] == 4
    plain = collect(PromptPool(cfg.replace(filter_groups=False)), FakeGenerator(gen.pattern), cfg.replace(
        filter_groups=False), 0, [lambda ex, t, s, n: s.reward])
    assert len(plain.groups) == 3 and plain.n_train == 3 and plain.stats["rounds"] == 1  # plain GRPO keeps all
    short = collect(PromptPool(cfg.replace(max_rounds=1)), FakeGenerator(gen.pattern), cfg.replace(max_rounds=1), 0,
                    [lambda ex, t, s, n: s.reward])
    assert short.n_train == 1 and len(short.groups) == 3 and short.stats["groups_short"] == 2  # padded, no loss


def test_the_pool_keeps_medium_to_hard_prompts_and_the_curriculum_promotes(vowels):
    assert parse_tasks("arithmetic@2, vowels") == {"arithmetic": 2, "vowels": 3}
    with pytest.raises(ValueError, match="difficulties 1..3"):
        parse_tasks("vowels@4")
    cfg = train_preset("rl", rl_tasks="vowels@2", pool_size=6, pool_k=4, keep_pass=0.5, promote_at=0.6,
                       refilter_every=5, system_prompts=False)
    pool = PromptPool(cfg)
    easy = FakeGenerator([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    stats = pool.refresh(easy, 0)
    assert [s % 3 for _, s in pool.entries["vowels"]] == [1, 2, 1, 2] and stats["pool_kept/vowels"] == 4 / 6
    assert pool.level["vowels"] == 1  # mean pass 0.42 < promote_at
    taken = pool.take(5)
    assert [ex.seed for ex in taken] == [s for _, s in pool.entries["vowels"]] + [pool.entries["vowels"][0][1]]
    pool.observe(taken * 4, [4] * 20, [4] * 20)  # the policy now solves everything at level 1
    state = pool.state_dict()
    again = PromptPool(cfg)
    again.load_state_dict(json.loads(json.dumps(state)))  # plain numbers: JSON round trip
    assert again.state_dict() == state
    pool.refresh(easy, 5)
    assert pool.level["vowels"] == 2 and all(d == 2 for d, _ in pool.entries["vowels"])
    ex = with_system(Vowels().example(7, 1), seed=0)
    systems = {(with_system(Vowels().example(s, 1), seed=0).messages[0].get("content")) for s in range(40)}
    assert len(systems) > 4 and ex == with_system(Vowels().example(7, 1), seed=0)  # varied, deterministic


# ---- whole runs ------------------------------------------------------------------------------------------------------
def _weights(out):
    return ckpt.load_snapshot(ckpt.latest(out / "ckpt"), ("model",))[1]["model"]


def test_rl_learns_the_reward_exports_and_resumes_exactly(base, tmp_path, vowels):
    cfg = _cfg(base, tmp_path / "a", steps=6, ckpt_every=3, eval_every=6)
    summary = rl(cfg)
    recs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 6 and all(0 <= r["frac_reward_zero_std"] <= 1 and r["staleness"] == 0 for r in train)
    assert train[-1]["rollout_tokens"] == summary["rollout_tokens"] > 0
    first, last = sum(r["reward_mean"] for r in train[:2]) / 2, sum(r["reward_mean"] for r in train[-2:]) / 2
    assert last > first + 0.1, (first, last)  # the policy moves toward vowels
    groups = [json.loads(ln) for ln in (tmp_path / "a" / ROLLOUTS_FILE).read_text().splitlines()]
    assert {g["step"] for g in groups} == set(range(6)) and all(len(g["answers"]) == 4 for g in groups)
    # the export is the trained model
    model, _ = ckpt.load_model(tmp_path / "a")
    hf = herd.from_pretrained(summary["hf"], dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    assert torch.allclose(hf(ids), model(ids), atol=1e-5)
    # 3 steps, then resume to 6: the same rollouts and the same weights as the unbroken run
    rl(cfg.replace(out_dir=str(tmp_path / "b"), max_steps=3))
    rl(cfg.replace(out_dir=str(tmp_path / "b")), resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / ROLLOUTS_FILE).read_text() == (tmp_path / "a" / ROLLOUTS_FILE).read_text()


def test_async_with_zero_staleness_is_sync_and_staleness_is_bounded(base, tmp_path):
    cfg = _cfg(base, tmp_path / "sync", rl_tasks="arithmetic@1", steps=2, export=False, samples=False)
    # a verifier-free reward with spread: arithmetic's rewards are all 0 on a random model
    length = [lambda ex, text, score, n: float(len(text))]
    rl(cfg, rewards=length)
    rl(cfg.replace(out_dir=str(tmp_path / "async0"), rl_async=True, max_staleness=0), rewards=length)
    a, b = _weights(tmp_path / "sync"), _weights(tmp_path / "async0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = ckpt.load_model(base)[0].state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the runs did update the weights
    assert (tmp_path / "sync" / ROLLOUTS_FILE).read_text() == (tmp_path / "async0" / ROLLOUTS_FILE).read_text()
    rl(cfg.replace(out_dir=str(tmp_path / "async1"), rl_async=True, max_staleness=1, steps=3), rewards=length)
    recs = [json.loads(ln) for ln in (tmp_path / "async1" / "metrics.jsonl").read_text().splitlines()]
    stale = [r["staleness"] for r in recs if r["kind"] == "train"]
    assert stale[0] == 0 and max(stale) == 1 and all(0 <= s <= 1 for s in stale)


def test_engine_generator_answers_with_token_ids_and_logprobs(base):
    model, _ = ckpt.load_model(base)
    tok = tiny_tokenizer()
    task = registry.get("arithmetic")
    exs = registry.draw(task, "train", 2, 1)
    out = EngineGenerator(model, tok).generate({"arithmetic": task}, exs, 3, 1.0, 6, seed=4)
    for s in out:
        assert len(s.output_ids) == 3 and all(len(i) == len(lp) == n for i, lp, n in
                                             zip(s.output_ids, s.logprobs, s.lengths, strict=True))
        # the logprobs are the model's own on those tokens (the behaviour policy the learner corrects for)
        ids = torch.tensor([s.prompt_ids + s.output_ids[0]])
        lp = torch.log_softmax(model(ids)[0, len(s.prompt_ids) - 1:-1].float(), -1)
        want = lp.gather(1, torch.tensor(s.output_ids[0])[:, None]).flatten()
        assert torch.allclose(want, torch.tensor(s.logprobs[0]), atol=1e-4)
    assert model.training  # handed back in training mode


def test_a_remote_server_generates_like_the_engine_and_rl_runs_through_it(base, tmp_path):
    import urllib.request

    from herd.post.rollouts import RemoteGenerator
    from tests.serve.server_process import ServerProcess

    pushed = tmp_path / "weights"
    pushed.mkdir()
    task = registry.get("arithmetic")
    exs = registry.draw(task, "train", 2, 1)
    model, _ = ckpt.load_model(base)
    local = EngineGenerator(model, tiny_tokenizer()).generate({"arithmetic": task}, exs, 3, 1.0, 6, seed=4)
    length = [lambda ex, text, score, n: float(len(text))]
    cfg = _cfg(base, tmp_path / "engine", rl_tasks="arithmetic@1", steps=2, export=False)
    rl(cfg, rewards=length)
    with ServerProcess(base, "--weights-dir", str(pushed)) as srv:
        remote = RemoteGenerator(srv.base, tiny_tokenizer()).generate({"arithmetic": task}, exs, 3, 1.0, 6, seed=4)
        for a, b in zip(local, remote, strict=True):
            assert a.output_ids == b.output_ids and a.completions == b.completions and a.prompt_ids == b.prompt_ids
            assert torch.allclose(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])), atol=1e-5)
        # the same run with the server as generator: weights pushed before each step's rollouts
        rl(cfg.replace(out_dir=str(tmp_path / "remote"), generator=srv.base, push_dir=str(pushed)), rewards=length)
        state = json.loads(urllib.request.urlopen(f"{srv.base}/v1/weights").read())
        assert state["version"] == 1  # steps 0 and 1 pushed
    assert (tmp_path / "remote" / ROLLOUTS_FILE).read_text() == (tmp_path / "engine" / ROLLOUTS_FILE).read_text()
    a, b = _weights(tmp_path / "engine"), _weights(tmp_path / "remote")
    # the server's logprobs differ from the in-process engine's in the last bits (another process's kernels): the
    # importance weights, and so the updates, agree to ~1e-6
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    init = ckpt.load_model(base)[0].state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the runs did update the weights


def test_multimodal_rl_on_scene_questions(tmp_path, monkeypatch):
    from herd.formats.hf import export
    from herd.post import rl as rl_module

    base = tmp_path / "mm"
    export(herd.build_model(herd.multimodal_preset("tiny"), seed=0), tiny_tokenizer(), base)
    seen = []
    real = rl_module.micro_batches

    def spy(*a, **kw):
        seen.extend(real(*a, **kw))
        return seen[-a[1].grad_accum:]

    monkeypatch.setattr(rl_module, "micro_batches", spy)
    cfg = _cfg(base, tmp_path / "run", rl_tasks="scenes@1", steps=1, batch_size=1, group_size=4,
               filter_groups=False, eval_every=1)
    summary = rl(cfg, rewards=[lambda ex, text, score, n: float(len(text))])  # random answers differ in length
    b = seen[0]
    tiles = b["pixel_values"].shape[0]
    assert tiles > 0 and tiles % 4 == 0  # each of the four answers' rows carries its prompt's image tiles
    before, after = ckpt.load_model(base)[0].state_dict(), _weights(tmp_path / "run")
    assert any(not torch.equal(before[k], after[k]) for k in after if "vision" in k)  # the vision tower learns too
    assert "val_pass@1/scenes" in summary
    group = json.loads((tmp_path / "run" / ROLLOUTS_FILE).read_text().splitlines()[0])
    assert group["task"] == "scenes" and group["messages"] is None  # images are regenerated from the seed


def test_herd_rl_command_trains_and_prints_how_to_chat(base, tmp_path, vowels, capsys):
    from herd.cli import main as herd_cli

    out = tmp_path / "cli"
    code = herd_cli(["rl", "--init", str(base), "--tasks", "vowels@1", "--out", str(out), "steps=1", "batch_size=1",
                     "group_size=2", "max_new_tokens=4", "rl_eval_prompts=1", "refilter_every=0", "plots=false"])
    printed = capsys.readouterr().out
    assert code == 0 and "RL on vowels@1" in printed and f"herd chat --model {out / 'hf'}" in printed
    assert json.loads((out / "train_config.json").read_text())["rl_tasks"] == "vowels@1"
    assert herd.from_pretrained(out / "hf", dtype=torch.float32) is not None
