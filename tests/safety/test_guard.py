"""The guard on tiny random herd models: the exact prompt ids, the unsafe score against a hand-computed softmax, the
threshold, the categories path, the scanner's decisions, and images reaching the model as image tokens.

Run: .venv/bin/python -m pytest tests/safety/test_guard.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import herd
import herd.infer.generate
from herd.safety import Decision, Guard, GuardScanner, GuardVerdict
from herd.tokenizer import tiny_tokenizer
from tests.safety.test_guard_prompt import BREAD, BREAD_REPLY, USER_ONE_TURN

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = Path(__file__).resolve().parents[1] / "data" / "images" / "square_h224_w224.png"
WRAP = "<|begin_of_text|><|header_start|>user<|header_end|>\n\n{}<|eot|><|header_start|>assistant<|header_end|>\n\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def text_model():
    return herd.build_model(herd.preset("tiny"), seed=0).eval()


@pytest.fixture(scope="module")
def mm_model():
    return herd.build_model(herd.multimodal_preset("tiny"), seed=0).eval()


def _last_probs(model, ids, pixel_values=None):
    """What the test computes by hand: softmax of the model's own last-position logits over the whole vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pixel_values=pixel_values)[0, -1]
    return torch.softmax(logits.float(), dim=-1)


def test_prompt_ids_are_the_golden_string_encoded(text_model, tok):
    ids, pixels = Guard(text_model, tok).prompt(BREAD)
    assert ids == tok.encode(WRAP.format(USER_ONE_TURN), allow_special=True)
    assert pixels is None


def test_unsafe_score_is_softmax_of_the_first_token(text_model, tok):
    guard = Guard(text_model, tok)
    ids, _ = guard.prompt(BREAD)
    unsafe_id = tok.encode("unsafe")[0]
    assert tok.encode("safe")[0] != unsafe_id  # "un" | "s"...: they differ at once, nothing to teacher-force
    assert guard.unsafe_score(BREAD) == pytest.approx(float(_last_probs(text_model, ids)[unsafe_id]), rel=1e-5)


def test_shared_reply_prefix_is_teacher_forced(text_model, tok):
    guard = Guard(text_model, tok, reply_prefix="\n\n")  # Llama Guard 4's template: the reply starts "\n\n"
    nn, un = tok.encode("\n\n"), tok.encode("unsafe")[0]
    assert tok.encode("\n\nsafe")[:1] == nn and tok.encode("\n\nunsafe")[:2] == nn + [un]
    ids, _ = guard.prompt(BREAD)
    expected = float(_last_probs(text_model, ids + nn)[un])
    assert guard.unsafe_score(BREAD) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(float(_last_probs(text_model, ids)[un]), rel=1e-3)  # the prefix mattered


def test_threshold_decides(text_model, tok):
    guard = Guard(text_model, tok)
    score = guard.unsafe_score(BREAD_REPLY)
    assert guard.classify(BREAD_REPLY, threshold=min(1.0, score * 1.01)) == GuardVerdict(True, (), score)
    unsafe = guard.classify(BREAD_REPLY, threshold=score)  # unsafe iff score >= threshold
    assert not unsafe.safe and unsafe.score == score
    with pytest.raises(ValueError, match="threshold"):
        guard.classify(BREAD, threshold=1.5)


def _scripted(monkeypatch, tok, text):
    """herd.infer.generate.generate continuing the prompt with `text` and <|eot|>."""
    def fake(model, input_ids, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.tensor([tok.encode(text) + [tok.special("eot")]])], dim=1)
    monkeypatch.setattr(herd.infer.generate, "generate", fake)


def test_categories_come_from_the_continuation(text_model, tok, monkeypatch):
    guard = Guard(text_model, tok)
    _scripted(monkeypatch, tok, "S1,S10")
    v = guard.classify(BREAD, threshold=0.0)
    assert (v.safe, v.categories, v.raw) == (False, ("S1", "S10"), "S1,S10")
    assert guard.classify(BREAD, threshold=0.0, exclude=["S1", "S10"]).safe  # only excluded ones named: safe
    _scripted(monkeypatch, tok, "whatever")
    v = guard.classify(BREAD, threshold=0.0)  # an unreadable category line keeps the verdict unsafe
    assert (v.safe, v.categories, v.raw) == (False, (), "whatever")


def test_scanner_decisions(text_model, tok):
    guard = Guard(text_model, tok)
    block = GuardScanner(guard, threshold=0.0).scan(BREAD)  # real greedy continuation of the random model
    assert block.decision is Decision.BLOCK and block.reason.startswith("unsafe user message")
    allow = GuardScanner(guard, threshold=1.0).scan(BREAD)
    assert allow.decision is Decision.ALLOW and 0.0 < allow.score < 1.0
    review = GuardScanner(guard, role="assistant", threshold=1.0, review_threshold=0.0).scan(BREAD_REPLY)
    assert review.decision is Decision.HUMAN_IN_THE_LOOP_REQUIRED
    with pytest.raises(ValueError, match="role='user'"):
        GuardScanner(guard, role="assistant").scan(BREAD)
    with pytest.raises(ValueError, match="role must be"):
        GuardScanner(guard, role="tool")


def test_images_become_image_tokens_and_reach_the_model(mm_model, tok):
    guard = Guard(mm_model, tok)
    messages = [{"role": "user", "content": [{"type": "text", "text": "How do I bake bread?"},
                                             {"type": "image_url", "image_url": {"url": str(IMAGE)}}]}]
    ids, pixels = guard.prompt(messages)
    assert pixels is not None and mm_model.image_token_index in ids
    head = tok.encode("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image_start|>", allow_special=True)
    assert ids[:len(head)] == head  # the image comes before "Task:"
    tail = tok.encode(USER_ONE_TURN + "<|eot|><|header_start|>assistant<|header_end|>\n\n", allow_special=True)
    assert ids[-len(tail):] == tail and ids[len(head) - 1:-len(tail)][-1] == tok.special("image_end")
    unsafe_id = tok.encode("unsafe")[0]
    expected = float(_last_probs(mm_model, ids, pixels)[unsafe_id])
    assert guard.unsafe_score(messages) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="text-only"):
        Guard(herd.build_model(herd.preset("tiny"), seed=0), tok).prompt(messages)


def test_from_pretrained_loads_checkpoint_and_tokenizer(text_model, tok, tmp_path):
    herd.save_pretrained(text_model, tmp_path)
    tok.save(tmp_path)
    loaded = Guard.from_pretrained(tmp_path)
    assert loaded.unsafe_score(BREAD) == pytest.approx(Guard(text_model, tok).unsafe_score(BREAD), rel=1e-6)


def test_a_conversation_longer_than_the_guard_context_is_a_clear_error(text_model, tok):
    guard = Guard(text_model, tok)
    limit = text_model.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than this guard model's {limit}-token context"):
        guard.unsafe_score([{"role": "user", "content": "word " * limit}])
