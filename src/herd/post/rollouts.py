"""Where RL's answers come from: a generator samples k answers per prompt with their token ids and log-probs.

    gen = EngineGenerator(model, tokenizer)              # herd's engine on the learner's own model (sync RL)
    gen = ChildGenerator(cfg, model_config)              # herd's engine in a child process (async RL)
    gen = RemoteGenerator("http://host:8000", tokenizer, push_dir="/shared/weights")   # herd serve, or vLLM
    sampled = gen.generate(tasks, examples, k=8, temperature=1.0, max_new_tokens=64, seed=s)
    gen.push(weights, version)     # the learner's new weights between batches: {"model", "biases", "config"}

Every generator returns herd.post.evaluate.Sampled records (one per prompt: completions, verifier scores, token ids,
log-probs), so the learner cannot tell them apart, and the in-process one IS the evaluation's sampling path
(`sample_examples`): RL's rollouts, `herd eval` and `herd serve` share one engine (herd.infer.engine) and one
sampler. Request seeds come from `sample_seed`, so the same weights give the same answers in every generator.

Log-probs are the engine's raw ones (log-softmax of the logits, herd.infer.sampling): the behaviour policy's
probabilities at temperature 1. The learner weights tokens by the truncated ratio of its own probability to these
(herd.post.rl_loss.policy_loss), which corrects both stale weights (async) and the engine's different numerics.

The remote generator speaks the OpenAI completions API with vLLM's extensions, which herd serve implements too:
the prompt goes as token ids (the chat template is applied here, once), `logprobs: 0` with
`return_tokens_as_token_ids: true` returns every generated token as "token_id:N" with its log-prob
(https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html). Weights are pushed by writing a Hugging Face
folder (herd.formats.hf) into the server's `--weights-dir` and POSTing /v1/weights: a shared disk, the way TRL's
vLLM server mode and OpenRLHF move weights between a learner and a serving engine when no NCCL link is set up.
Prompts with images need the in-process or child engine.
"""

from __future__ import annotations

import json
import multiprocessing
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from herd.post.evaluate import Sampled, sample_examples, sample_seed
from herd.tasks.base import Example, Score, Task


class EngineGenerator:
    """herd's engine on a model in this process (the learner's own in synchronous RL: nothing to push)."""

    def __init__(self, model, tokenizer, max_batch: int = 64):
        self.model, self.tok, self.max_batch, self.version = model, tokenizer, max_batch, 0

    def generate(self, tasks: Mapping[str, Task], examples: Sequence[Example], k: int, temperature: float,
                 max_new_tokens: int, seed: int) -> list[Sampled]:
        was_training = self.model.training
        try:
            return sample_examples(self.model, self.tok, tasks, examples, k, temperature, max_new_tokens, seed,
                                   self.max_batch, logprobs=True)
        finally:
            self.model.train(was_training)

    def push(self, weights: dict, version: int) -> None:
        """Load `weights` ({"model": state dict, "biases": router biases}) unless they are this model's own."""
        if weights.get("model") is not None:
            _load(self.model, weights)
        self.version = version

    def close(self) -> None:
        pass


def _load(model, weights: dict) -> None:
    from herd.train.snapshots import set_expert_biases

    model.load_state_dict(weights["model"])
    set_expert_biases(model, weights["biases"])


# ---- herd's engine in a child process -------------------------------------------------------------------------------
def _child(conn, cfg, model_config, threads: int) -> None:
    """The child's loop: ("push", weights, version) -> loads; ("generate", args) -> Sampled list; ("close",)."""
    import herd
    from herd.train.inputs import tokenizer

    torch.set_num_threads(threads)
    model = herd.build_model(model_config).eval()
    gen = EngineGenerator(model, tokenizer(cfg))
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "close":
                return
            if msg[0] == "push":
                gen.push(msg[1], msg[2])
                conn.send(("ok", gen.version))
            else:
                conn.send(("ok", gen.generate(*msg[1])))
        except Exception as e:  # reported to the learner, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class ChildGenerator:
    """herd's engine on a copy of the model in a child process, so that generating and learning overlap (async RL).
    The child is spawned (a fresh interpreter: no forked torch state) and gets weights as tensors, and the tasks
    (which must be importable, module-level objects), over a pipe that only ever carries this process's own
    objects."""

    def __init__(self, cfg, model_config, threads: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, cfg, model_config,
                                                     threads or torch.get_num_threads()), daemon=True)
        self.proc.start()
        self.version = -1

    def _call(self, *msg):
        self.conn.send(msg)
        status, out = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"the generator process failed: {out}")
        return out

    def generate(self, tasks, examples, k, temperature, max_new_tokens, seed) -> list[Sampled]:
        return self._call("generate", (dict(tasks), list(examples), k, temperature, max_new_tokens, seed))

    def push(self, weights: dict, version: int) -> None:
        self.version = self._call("push", weights, version)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("close",))
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


# ---- a remote OpenAI-compatible server -------------------------------------------------------------------------------
class RemoteGenerator:
    """Rollouts from a server's /v1/completions (herd serve, vLLM); weights pushed through its /v1/weights."""

    def __init__(self, url: str, tokenizer, push_dir: str | None = None, api_key: str | None = None,
                 model: str | None = None, concurrency: int = 32, timeout: float = 600.0):
        self.url, self.tok, self.api_key, self.model = url.rstrip("/"), tokenizer, api_key, model
        self.push_dir = Path(push_dir) if push_dir else None
        self.concurrency, self.timeout, self.version = concurrency, timeout, 0

    def _post(self, route: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + route, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url}{route} answered {e.code}: {e.read().decode(errors='replace')[:500]}") \
                from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach the generator at {self.url}: {e.reason}; start it (herd serve "
                               f"--weights-dir DIR) or use generator=engine") from None

    def _one(self, ids: list[int], temperature: float, max_new_tokens: int, seed: int) -> tuple[str, list, list]:
        body = {"prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                "logprobs": 0, "return_tokens_as_token_ids": True, **({"model": self.model} if self.model else {})}
        choice = self._post("/v1/completions", body)["choices"][0]
        lp = choice["logprobs"]
        out_ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
        return choice["text"], out_ids, [float(x) for x in lp["token_logprobs"]]

    def generate(self, tasks, examples, k, temperature, max_new_tokens, seed) -> list[Sampled]:
        from herd.chat import prepare_chat

        jobs = []
        for ex in examples:
            ids, images = prepare_chat(ex.messages, self.tok, tools=ex.tools)
            if images is not None:
                raise ValueError(f"task {ex.task!r} shows images: remote rollouts send token ids, which carry no "
                                 "pixels; use generator=engine for multimodal RL")
            jobs.append((ex, ids, [sample_seed(seed, ex, j) for j in range(k)]))
        with ThreadPoolExecutor(self.concurrency) as pool:  # all at once, so the server batches them
            futures = [[pool.submit(self._one, ids, temperature, max_new_tokens, s) for s in seeds]
                       for _, ids, seeds in jobs]
            results = [[f.result() for f in fs] for fs in futures]
        out = []
        for (ex, ids, seeds), res in zip(jobs, results, strict=True):
            task = tasks[ex.task]
            scores: list[Score] = [task.score(ex, text) for text, _, _ in res]
            out.append(Sampled(ex, len(ids), seeds, [r[0] for r in res], scores, [len(r[1]) for r in res],
                               [None] * len(res), [r[1] for r in res], [r[2] for r in res], None, ids))
        return out

    def push(self, weights: dict, version: int) -> None:
        """Write the weights as a Hugging Face folder under the server's weights dir and ask it to load them."""
        from herd.formats.hf import export
        from herd.train.snapshots import plain_model

        if self.push_dir is None:
            raise ValueError("a remote generator needs push_dir (the server's --weights-dir) to receive new weights")
        name = f"v{version:06d}"
        export(plain_model(weights["model"], weights["biases"], weights["config"]), self.tok, self.push_dir / name)
        self.version = int(self._post("/v1/weights", {"path": name, "version": version})["version"])
        import shutil

        for old in sorted(self.push_dir.glob("v[0-9]*"))[:-2]:  # the server has read them; keep the last two
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        pass
