"""Tool calls end to end: a real `herd serve` process on 127.0.0.1 and the official `openai` client.

A random model never writes a call, so the module first overfits the tiny preset (about 80 AdamW steps, seconds on
one CPU thread) to answer four questions, asked with the same `tools` list the requests send and rendered by
herd.chat exactly as the server renders them, with a call each: Llama 4's pythonic list, the JSON object herd's chat
format writes for an assistant tool-call turn, prose followed by two parallel calls, and Meta's
<|python_start|>code<|python_end|> code-interpreter call. Each answer ends with
<|eom|>, as Meta's format ends a turn that calls a tool. Then, greedy: finish_reason "tool_calls" and the calls with
their decoded arguments, the same streamed (deltas accumulated by index, as OpenAI clients do), a tool result sent
back in a follow-up turn, and no calls under tool_choice "none".

Run: .venv/bin/python -m pytest tests/serve/test_tool_calls.py -v
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.serve.server_process import ServerProcess

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time"}},
         {"type": "function", "function": {"name": "code_interpreter"}}]
# (question, what the model is taught to write, expected content, expected calls). The JSON answer is written by
# herd.chat (<|python_start|><|python_end|> + the call object), the others are plain text.
CASES = [
    ("What is the weather in Paris?", '[get_weather(city="Paris", unit="celsius")]', None,
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("What time is it in Tokyo?", "json", None, [("get_time", {"timezone": "Asia/Tokyo"})]),
    ("Weather and time in Rome?", 'Let me look that up. [get_weather(city="Rome"), get_time(timezone="Europe/Rome")]',
     "Let me look that up.", [("get_weather", {"city": "Rome"}), ("get_time", {"timezone": "Europe/Rome"})]),
    # Meta's code-interpreter call: special tokens around the code, which the server must not skip for a tool request
    ("Compute six times seven in Python.", "<|python_start|>print(6 * 7)<|python_end|>", None,
     [("code_interpreter", {"code": "print(6 * 7)"})]),
]
STEPS, LR, MAX_LOSS = 80, 1e-2, 0.1  # greedy answers come out right from about 40 steps (loss ~0.3); 80: ~0.02


def _rows(tok, chunk: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per case; the prompt is what the server renders for [user question] + TOOLS."""
    from herd.chat import format_chat

    rows = []
    for question, answer, _, calls in CASES:
        user = [{"role": "user", "content": question}]
        prompt = format_chat(user, tok, tools=TOOLS)
        if answer == "json":
            turn = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                                                       for n, a in calls]}
            full = format_chat(user + [turn], tok, add_generation_prompt=False, tools=TOOLS)
            assert full[:len(prompt)] == prompt
            ids = full[len(prompt):]
        else:
            ids = tok.encode(answer, allow_special=True) + [tok.special("eom")]
        rows.append((prompt, ids))
    # The chunked (RoPE) layers at a prompt's last position see only its last attention chunk; a question that ends
    # outside it is told apart by the one NoPE layer alone, which 80 steps do not reliably teach.
    tails = {tuple(p[(len(p) - 1) // chunk * chunk:]) for p, _ in rows}
    assert len(tails) == len(rows), "reword the questions: each prompt's last attention chunk must hold its own words"
    return rows


def train_tool_caller(out, seed: int = 0) -> float:
    """Overfit the tiny preset on CASES and save it with its tokenizer as a checkpoint in `out`; the final loss."""
    from herd import build_model, preset, save_pretrained
    from herd.tokenizer import tiny_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok, cfg = tiny_tokenizer(), preset("tiny")
        rows = _rows(tok, cfg.attention_chunk_size)
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T) right-padded: padding is never attended to
        labels = torch.full((len(rows), width), -100)  # targets: the answers only
        for i, (p, a) in enumerate(rows):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
        model = build_model(cfg, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / STEPS))
        for _ in range(STEPS):
            loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        save_pretrained(model, out)
        tok.save(out)
        return loss.item()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from openai import OpenAI

    ckpt = tmp_path_factory.mktemp("tool-caller")
    loss = train_tool_caller(ckpt)
    assert loss < MAX_LOSS, f"the tool-call model did not learn its answers: loss {loss:.3f} after {STEPS} steps"
    with ServerProcess(ckpt, "--name", "tiny") as srv:
        yield OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client, question: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          tools=TOOLS, temperature=0, max_tokens=64, **kw)


def _streamed(client, question: str) -> tuple[str, list[dict], list[str]]:
    """(content, calls, finish reasons) of a streamed answer, tool-call deltas joined by index as clients do."""
    content, calls, reasons = "", {}, []
    for chunk in _ask(client, question, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.delta.tool_calls:  # as OpenAI: no empty-string content beside tool-call deltas
                assert choice.delta.content is None or choice.delta.content.strip()
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "type": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["type"] += d.type or ""
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return content, [calls[i] for i in sorted(calls)], reasons


@pytest.mark.parametrize("question, _, content, calls", CASES, ids=["pythonic", "json", "prose-then-two", "code"])
def test_a_call_comes_back_as_tool_calls(client, question, _, content, calls):
    out = _ask(client, question, tool_choice="auto")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content == content
    got = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got] == calls
    assert all(c.type == "function" and c.id for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("question, _, content, calls", CASES, ids=["pythonic", "json", "prose-then-two", "code"])
def test_streaming_gives_the_same_calls(client, question, _, content, calls):
    text, streamed, reasons = _streamed(client, question)
    assert reasons == ["tool_calls"]
    assert text == (content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
    assert all(c["type"] == "function" and c["id"] for c in streamed)


def test_a_tool_result_turn_is_accepted(client):
    question = CASES[0][0]
    first = _ask(client, question).choices[0].message
    call = first.tool_calls[0]
    messages = [{"role": "user", "content": question}, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=8)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens > 0  # what it says is not tested


def test_tool_choice_none_calls_nothing(client):
    out = _ask(client, CASES[0][0], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


def test_a_finish_seen_before_its_last_deltas_loses_no_text():
    """The engine thread marks a request finished before its last deltas reach the stream's queue; a stream that
    wakes in between (its queue wait timed out) must still send all the text and the call parsed from it."""
    import asyncio
    from types import SimpleNamespace

    from herd.config import preset
    from herd.serve.app import create_app
    from herd.serve.serve_config import ServeConfig
    from herd.serve.service import Service
    from herd.tokenizer import tiny_tokenizer

    text = 'Sure. [get_weather(city="Paris")]'

    class LateWorker:  # the request is done at once; its only delta arrives after the stream's first queue timeout
        engine = SimpleNamespace(model=SimpleNamespace(text_config=preset("tiny"), vision_config=None))
        queue_length = running = 0

        def submit(self, ids, params, pixel_values=None, generate=True):
            req = SimpleNamespace(finished=True, finish_reason="stop", text=text, params=params, logprobs=[],
                                  output_ids=[1] * 9)
            queue = asyncio.Queue()
            asyncio.get_running_loop().call_later(0.2, queue.put_nowait, (text, True))
            return req, queue

        def cancel(self, req):
            pass

    app = create_app(Service(ServeConfig(model="tiny", name="tiny"), LateWorker(), tiny_tokenizer()))
    body = {"model": "tiny", "stream": True, "tools": TOOLS, "messages": [{"role": "user", "content": "Weather?"}]}

    async def post() -> list[dict]:
        request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
        sent = []

        async def receive():
            if request:
                return request.pop()
            await asyncio.Event().wait()  # the client never leaves

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
        await app(scope, receive, send)
        events = b"".join(m.get("body", b"") for m in sent).decode().split("\n\n")
        return [json.loads(e[6:]) for e in events if e.startswith("data: {")]

    choices = [c for chunk in asyncio.run(post()) for c in chunk["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == "Sure."
    calls = [t["function"] for c in choices for t in c["delta"].get("tool_calls", [])]
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_tool_choice_picks_what_the_prompt_shows():
    from herd.serve.service import APIError, tools_for

    weather, time_ = ({"type": "function", "function": {"name": n, "parameters": {}}}
                      for n in ("get_weather", "get_time"))
    assert tools_for(None, [weather, time_]) == tools_for("auto", [weather, time_]) == [weather, time_]
    assert tools_for("none", [weather]) is None and tools_for(None, []) is None
    assert tools_for({"type": "function", "function": {"name": "get_time"}}, [weather, time_]) == [time_]
    for bad in ("required", "always", {"type": "function"}, {"type": "function", "function": {"name": "rm"}}):
        with pytest.raises(APIError):
            tools_for(bad, [weather, time_])
