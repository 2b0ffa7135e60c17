"""lm-eval (EleutherAI's lm-evaluation-harness) evaluating a model through `herd serve`: its `local-completions`
model scores a local multiple-choice task and a rolling-perplexity task with the completions API's `echo` +
`logprobs` (herd.serve.scoring), and the loglikelihoods it records equal herd's in-process ones.

lm-eval sends token ids (`tokenized_requests`, its default) encoded by the checkpoint's own tokenizer.json, which
it loads with transformers; the data is a JSON file written here (no network).

Run: .venv/bin/python -m pytest tests/serve/test_lm_eval.py -v
"""

from __future__ import annotations

import json

import lm_eval  # the dev extra
import pytest
import torch

from herd.formats.hf import from_pretrained
from tests.serve.server_process import ServerProcess, init_checkpoint

QUESTIONS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four"], "answer": 1},
    {"question": "A river flows into the", "choices": ["sea", "mountain", "attic", "spoon"], "answer": 0},
]
TOL = 1e-5  # per token: float32, the server's forward against this process's
TEXTS = [{"text": "Once upon a time there was a king who loved the sea."}, {"text": "The river ran on."}]


def _tasks(tmp_path) -> list[dict]:
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TEXTS))

    def local(name: str, file: str, **kw) -> dict:
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / file)}},
                "test_split": "test", **kw}

    return [local("herd_mc", "mc.jsonl", output_type="multiple_choice", doc_to_text="{{question}}",
                  doc_to_choice="{{choices}}", doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}]),
            local("herd_ppl", "text.jsonl", output_type="loglikelihood_rolling", doc_to_text="",
                  doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])]


def _logprob(model, ids: list[int], start: int) -> float:
    """herd in process: the log-probability of ids[start:] given what precedes them."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)  # (T - 1, V)
    return float(lp[start - 1:].gather(-1, torch.tensor(ids[start:])[:, None]).sum())


def test_lm_eval_loglikelihoods_through_herd_serve_equal_herds_own(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    ckpt = init_checkpoint(tmp_path / "tiny")
    model = from_pretrained(ckpt).float().eval()
    with ServerProcess(ckpt, "--name", "tiny", "--dtype", "float32") as srv:
        lm = LocalCompletionsAPI(base_url=f"{srv.base}/v1/completions", model="tiny", tokenizer=str(ckpt),
                                 tokenizer_backend="huggingface", tokenized_requests=True, max_length=512)
        out = lm_eval.simple_evaluate(model=lm, tasks=_tasks(tmp_path), log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_defaults=False))  # skip indexing its tasks
    assert set(out["results"]) == {"herd_mc", "herd_ppl"}

    mc = out["samples"]["herd_mc"]
    assert len(mc) == len(QUESTIONS)
    for sample in mc:
        doc = sample["doc"]
        assert len(sample["resps"]) == len(doc["choices"])
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ctx, cont = lm._encode_pair(context, continuation)  # lm-eval's own tokenization of the request
            assert resp[0][0] == pytest.approx(_logprob(model, ctx + cont, len(ctx)), abs=TOL * len(cont))

    ppl = out["samples"]["herd_ppl"]
    assert len(ppl) == len(TEXTS)
    for sample in ppl:  # one window: the text after lm-eval's prefix token (the BOS)
        ids = [lm.prefix_token_id] + lm.tok_encode(sample["doc"]["text"])
        assert sample["resps"][0][0] == pytest.approx(_logprob(model, ids, 1), abs=TOL * len(ids))
