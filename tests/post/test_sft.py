"""SFT (herd.post.sft, herd.post.sft_data): assistant-only labels token by token, packing that keeps
conversations apart, judge pruning, malformed data, and `herd sft` end to end (export, exact resume).

Run: .venv/bin/python -m pytest tests/post/test_sft.py -v
"""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.chat import format_chat
from herd.cli import main as herd_cli
from herd.data.sources import DataError
from herd.post import sft as sft_mod
from herd.post.sft_data import ChatPacker, Conversation, Example, encode, example, read_jsonl
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train import train_preset
from herd.train.inputs import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]


def test_labels_are_exactly_the_assistant_tokens():
    tok = tiny_tokenizer()
    ids, labels = encode(Conversation(CHAT, TOOLS), tok, 10_000)
    full = format_chat(CHAT, tok, add_generation_prompt=False, tools=TOOLS)
    assert ids == full
    # the oracle, read off the rendering: after each `<|header_start|>assistant<|header_end|>` and its "\n\n", every
    # token through the turn's end token (<|eom|> after tool calls, <|eot|> otherwise) is a target; nothing else
    sp, want, t = tok.special, set(), 0
    while t < len(full):
        end = full.index(sp("header_end"), t) if full[t] == sp("header_start") else -1
        if end > 0 and tok.decode(full[t + 1:end]) == "assistant":
            assert tok.decode(full[end + 1:end + 2]) == "\n\n"
            t = end + 2
            while full[t] not in (sp("eot"), sp("eom")):
                want.add(t)
                t += 1
            want.add(t)
        t += 1
    got = {t + 1 for t, y in enumerate(labels) if y != IGNORE}
    assert got == want
    assert all(labels[t - 1] == full[t] for t in want)
    assert len(labels) == len(ids) and labels[-1] == IGNORE
    ends = [full[t] for t in sorted(want) if full[t] in (sp("eot"), sp("eom"))]
    assert ends == [sp("eom"), sp("eot")]  # the tool-call turn ends with <|eom|>, the answer with <|eot|>
    text = tok.decode([full[t] for t in sorted(want) if full[t] not in (sp("eot"), sp("eom"))])
    assert "Let me look." in text and '"get_weather"' in text and "It is sunny." in text
    assert "sunny\"" not in text and "Paris?" not in text and "Be brief" not in text  # tool result, user, system


def test_packing_keeps_conversations_apart_and_resumes():
    examples = [Example([10 + i] * n, [i] * (n - 1) + [IGNORE]) for i, n in enumerate([5, 3, 7, 4, 6, 2])]
    packer = ChatPacker(examples, seq_len=10, batch_size=2, pad_id=0, seed=1)
    seen = []
    for _ in range(3):
        b = next(packer)
        for ids, labels, docs in zip(b["input_ids"].tolist(), b["labels"].tolist(), b["doc_ids"].tolist(),
                                     strict=True):
            for d in sorted(set(docs) - {-1}):  # each doc id is exactly one whole conversation
                span = [k for k, x in enumerate(docs) if x == d]
                assert span == list(range(span[0], span[0] + len(span)))
                i = ids[span[0]] - 10
                assert (ids[span[0]:span[-1] + 1], labels[span[0]:span[-1] + 1]) == (examples[i].ids,
                                                                          examples[i].labels)
                seen.append(i)
            real = [x for x in docs if x != -1]
            assert real == sorted(real) and sorted(set(real)) == list(range(len(set(real))))  # 0, 1, ... in order
            pad = [k for k, x in enumerate(docs) if x == -1]
            assert pad == list(range(len(real), len(docs)))  # padding only at the end
            assert all(labels[k] == IGNORE for k in pad)
    assert sorted(seen[:6]) == list(range(6))  # the first epoch visits every conversation once
    state = packer.state_dict()
    again = ChatPacker(examples, seq_len=10, batch_size=2, pad_id=0, seed=1)
    again.load_state_dict(state)
    for _ in range(3):
        a, b = next(packer), next(again)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _jsonl(path, n):
    lines = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
             for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_pruning_drops_the_easiest_and_writes_the_scores(tmp_path, monkeypatch):
    scores = [5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 2.0]  # the easiest half: indices 3, 1, 5, 7 (ties by index)
    calls = []

    def fake(judge, examples, device="cpu", batch_size=8, vision=None):
        calls.append(judge)
        return scores[:len(examples)]

    monkeypatch.setattr(sft_mod, "judge_scores", fake)
    data = _jsonl(tmp_path / "chats.jsonl", 8)
    cfg = train_preset("sft", sft_data=str(data), init="JUDGE-INIT", prune_easy=0.5, out_dir=str(tmp_path / "o"))
    rows = sft_mod.chat_rows(cfg, tiny_tokenizer(), "train")
    assert calls == ["JUDGE-INIT"]  # default judge: the model being tuned
    everything = [example(c, tiny_tokenizer(), cfg.seq_len) for c in read_jsonl(data)]
    assert rows.items == [everything[i] for i in (0, 2, 4, 6)]
    recs = [json.loads(x) for x in (tmp_path / "o" / "sft_judge_scores.jsonl").read_text().splitlines()]
    assert [(r["index"], r["score"], r["kept"]) for r in recs] == \
        [(i, s, i in (0, 2, 4, 6)) for i, s in enumerate(scores)]
    assert sft_mod.prune_easy([1.0, 1.0, 1.0], 0.95) == [2]  # always keeps one
    sft_mod.chat_rows(cfg.replace(judge="OTHER"), tiny_tokenizer(), "train")
    assert calls[-1] == "OTHER"


def test_pruning_drops_the_easy_part_of_each_task(monkeypatch, tmp_path):
    """tasks: data is pruned within each task: a task whose answers the judge finds predictable as a whole
    (every counting score below every arithmetic one) still keeps its harder half."""
    monkeypatch.setattr(sft_mod, "judge_scores", lambda judge, examples, *a, **k:
                        [float(i) if i < 4 else 10.0 + i for i in range(len(examples))])
    cfg = train_preset("sft", sft_data="tasks:counting,arithmetic@1", sft_examples=4, init="J", prune_easy=0.5,
                       out_dir=str(tmp_path / "o"))
    sft_mod.chat_rows(cfg, tiny_tokenizer(), "train")
    recs = [json.loads(x) for x in (tmp_path / "o" / "sft_judge_scores.jsonl").read_text().splitlines()]
    assert [(r["source"].split()[1], r["kept"]) for r in recs] == \
        [("counting", False)] * 2 + [("counting", True)] * 2 + [("arithmetic", False)] * 2 + [("arithmetic", True)] * 2
    assert sft_mod.prune_easy([3.0, 1.0, 2.0, 0.0], 0.5) == [0, 2]  # one group: the global easiest half
    assert sft_mod.prune_easy([3.0, 1.0, 2.0, 0.0], 0.5, ["a", "a", "b", "b"]) == [0, 2]
    assert sft_mod.prune_easy([0.0, 1.0, 2.0, 3.0], 0.5, ["a", "a", "b", "b"]) == [1, 3]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"messages": []}', 'line 2: expected an object with a non-empty "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', 'line 2: message 0 needs a "role"'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: no assistant message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{oops"}}]}]}', "line 2: tool call 'f' has arguments that are not JSON"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}, '
     '{"role": "assistant", "content": "x"}]}', "line 2: message 0: image file 'a.png' not found"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}, '
     '{"role": "assistant", "content": "x"}]}', "line 2: message 0: remote image 'https://x/a.png': herd does not"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}',
     "line 2: message 0: an image part needs a source"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image_url", '
     '"image_url": {"url": "a.png"}}]}]}', "line 2: message 1 .assistant. holds an image; images go in user"),
])
def test_malformed_lines_name_the_line_and_the_problem(tmp_path, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", 1)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        [encode(c, tiny_tokenizer(), 512) for c in read_jsonl(path)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    assert herd_cli(["init", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def _final_weights(run):
    return ckpt.load(ckpt.latest(run / "ckpt"))["model"]


SMALL = ["seq_len=96", "batch_size=2", "eval_batches=1", "eval_every=2", "ckpt_every=2", "log_every=1",
         "plots=false", "steps=4", "warmup=1"]


def test_herd_sft_on_a_jsonl_exports_and_resumes_exactly(base, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {i} and 1."},
                                                     {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                            for i in range(6)))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["sft", "--init", str(base), "--data", str(data), *SMALL, "prune_easy=0.5"]
    assert herd_cli([*args, "--out", str(whole)]) == 0
    assert herd_cli([*args, "--out", str(broken), "--max-steps", "3"]) == 0
    assert herd_cli(["sft", "--resume", str(broken), "--max-steps", "4"]) == 0
    a, b = _final_weights(whole), _final_weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = [json.loads(x)["kept"] for x in (whole / "sft_judge_scores.jsonl").read_text().splitlines()]
    assert sum(kept) == 3
    model = herd.from_pretrained(str(whole / "hf"))
    assert model.config.text_config.vocab_size > 0
    recs = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]


def test_herd_sft_on_tasks(base, tmp_path):
    out = tmp_path / "tasks"
    assert herd_cli(["sft", "--init", str(base), "--data", "tasks:arithmetic@1", "--out", str(out), *SMALL,
                     "sft_examples=8", "steps=2", "--max-steps", "2"]) == 0
    assert (out / "hf" / "model.safetensors").is_file()
    assert herd_cli(["sft", "--init", str(base), "--data", "tasks:scenes", "--out", str(tmp_path / "no"),
                     *SMALL]) == 2  # image tasks need a multimodal init (tests/post/test_sft_images.py)


def test_task_examples_difficulty_ranges():
    """tasks:NAME@LO-HI spreads the examples evenly over LO..HI; @D is one difficulty; bad ranges are named."""
    from herd.post.sft_data import task_examples

    assert [e.difficulty for e in task_examples("arithmetic@2-3", 5, "train")] == [2, 2, 2, 3, 3]
    assert {e.difficulty for e in task_examples("counting@2", 3, "train")} == {2}
    assert {e.difficulty for e in task_examples("counting", 12, "train")} == set(range(1, 7))
    for bad in ("arithmetic@3-2", "arithmetic@0", "arithmetic@1-9", "arithmetic@x"):
        with pytest.raises(DataError, match="difficulty"):
            task_examples(bad, 2, "train")


# ---- a checkpoint with its own chat template (SmolLM2's ChatML, herd's default model) ------------------------------
# SmolLM2-Instruct's template in form: a default system prompt when none is given, then ChatML turns
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe helpful."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TWO_TURNS = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
             {"role": "user", "content": "And 4 and 4?"}, {"role": "assistant", "content": "4 + 4 = 8\n#### 8"}]


def _chatml_tokenizer(template: str = CHATML):
    """A byte-level BPE trained here with ChatML's specials and no Llama 4 chat tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from herd.tokenizer import Tokenizer

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(["Add 2 and 3. And 4 and 4? 2 + 3 = 5 #### 5 system user assistant Be helpful.\n"] * 50,
                             trainer)
    return Tokenizer(rust, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token=None, chat_template=template)


def test_a_checkpoint_template_labels_each_answer_and_its_end():
    """A tokenizer without Llama 4's chat tokens trains in its own template (herd.chat.default_template, what herd
    eval and herd chat ask it in): the targets are each answer's text, <|im_end|> and the template's newline after
    it; the default system prompt, the user turns and the `<|im_start|>assistant\\n` scaffolding predict nothing."""
    from herd.chat import default_template
    from herd.formats.chat_template import render_text

    tok = _chatml_tokenizer()
    assert default_template(tok) == CHATML
    ids, labels = encode(Conversation(TWO_TURNS), tok, 10_000)
    assert ids == tok.encode(render_text(CHATML, TWO_TURNS, add_generation_prompt=False), allow_special=True)
    spans, cur = [], []  # the labelled stretches, decoded
    for t, y in enumerate(labels):
        if y != IGNORE:
            assert y == ids[t + 1]
            cur.append(y)
        elif cur:
            spans, cur = spans + [tok.decode(cur, skip_special=False)], []
    assert spans + ([tok.decode(cur, skip_special=False)] if cur else []) == \
        ["2 + 3 = 5\n#### 5<|im_end|>\n", "4 + 4 = 8\n#### 8<|im_end|>\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """Templates that drop or change past answers as the chat grows (e.g. reasoning templates that strip earlier
    thoughts) have no single token stream to label: refused by name, never mislabelled."""
    forgetful = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"message 1 \(assistant\).*cannot be told apart"):
        encode(Conversation(TWO_TURNS, where="chats.jsonl line 1"), _chatml_tokenizer(forgetful), 10_000)


def test_herd_sft_on_a_gguf_trains_in_its_own_tokens_and_template(tmp_path):
    """herd sft --init FILE.gguf: the file's tokenizer and chat template (not herd's tiny one), the weights from the
    file, and an export that chats in the same template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.tokenizer import Tokenizer

    tok = _chatml_tokenizer()
    src = tmp_path / "llama"
    cfg = LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save(src)
    gguf_file = tmp_path / "model.gguf"
    assert herd_cli(["export", "--gguf", str(gguf_file), "--type", "f32", "--model", str(src)]) == 0
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": TWO_TURNS}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    assert herd_cli(["sft", "--init", str(gguf_file), "--data", str(data), "--out", str(out), *SMALL, "steps=2"]) == 0
    tuned = Tokenizer.from_pretrained(out / "hf")
    assert tuned.encode("Add 2 and 3.") == tok.encode("Add 2 and 3.") and tuned.chat_template == CHATML
    assert "<|im_start|>" in tuned.specials and "<|header_start|>" not in tuned.specials
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x][0]
    assert first["loss"] < 7.0  # ln(416) = 6.03 from a random model: its own tokens, not the tiny tokenizer's 2048


def test_sources_joined_by_plus_keep_image_chats_beside_the_tasks():
    from herd.data.sources import DataError
    from herd.post.sft_data import conversations

    cfg = train_preset("sft", sft_data="tasks:counting@1+scenes:qa", sft_examples=40, init="X")
    train, val = conversations(cfg, "train"), conversations(cfg, "val")
    assert len(train) == 80 and len(val) == 4
    scenes = [c for c in train if c.where.startswith("scenes qa")]
    assert len(scenes) == 40 and all(c.messages[0]["content"][0]["type"] == "image_url" for c in scenes)
    assert all("####" not in c.messages[-1]["content"] for c in scenes)  # bare answers, as the scene evaluation reads
    images = lambda convs: [c.messages[0]["content"][0]["image_url"]["url"].tobytes() for c in convs  # noqa: E731
                            if c.where.startswith("scenes")]
    assert len(images(val)) == 2 and not set(images(val)) & set(images(train))  # the validation stream's scenes
    with pytest.raises(DataError, match="scene task must be one of"):
        conversations(train_preset("sft", sft_data="scenes:nope", init="X"), "train")
