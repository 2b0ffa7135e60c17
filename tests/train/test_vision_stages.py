"""The vision encoder's stages (herd.train.vision_stages, herd.train.contrastive) and the look diagnostics
(herd.train.vision_diagnostics): the losses against hand-computed values, a fresh tower on a text checkpoint that
leaves the decoder's function alone, frozen parts bitwise unchanged, exact resume of each stage (the contrastive
loss's own scale and bias included), the export read by transformers with the same logits, and attention shares
read from the probabilities SDPA really used.

Run: .venv/bin/python -m pytest tests/train/test_vision_stages.py -v
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import herd
from herd.config import ConfigError
from herd.data.synthetic import scene_chat
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train import train, train_preset
from herd.train.contrastive import retrieval, sigmoid_loss, softmax_loss, token_similarity
from herd.train.vision_stages import attach_tower, parts
from tests.train import transformers_logit_gap

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sigmoid_and_softmax_losses_equal_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # unit rows
    y = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    t, b = 2.0, -1.0
    # SigLIP: -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)); dots: x0.y0 0.8, x0.y1 0, x1.y0 0.96, x1.y1 0.8
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = -(math.log(sig(2 * 0.8 - 1)) + math.log(sig(-(2 * 0.0 - 1))) + math.log(sig(-(2 * 0.96 - 1)))
             + math.log(sig(2 * 0.8 - 1))) / 2
    got = sigmoid_loss(x @ y.T, torch.tensor(math.log(t)), torch.tensor(b))
    assert abs(float(got) - want) < 1e-6
    # CLIP: mean of row-wise and column-wise cross-entropy of t x.y = [[1.6, 0], [1.92, 1.6]]
    row = -(math.log(math.exp(1.6) / (math.exp(1.6) + 1)) + math.log(math.exp(1.6) / (math.exp(1.92) + math.exp(1.6))))
    col = -(math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(1.92))) + math.log(math.exp(1.6) / (1 + math.exp(1.6))))
    assert abs(float(softmax_loss(x @ y.T, torch.tensor(math.log(t)))) - (row / 2 + col / 2) / 2) < 1e-6


def test_token_similarity_averages_each_caption_tokens_best_image_token():
    # image 0: tokens e0, e1 (+ a padding token that would win every max); image 1: token e2 only
    x = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], [[0, 0, 1.0], [9.0, 9.0, 9.0], [0, 0, 0]]])
    x_mask = torch.tensor([[True, True, False], [True, False, False]])
    # caption 0: tokens e0, (0.6, 0.8, 0); caption 1: e2 and a padding token
    y = torch.tensor([[[1.0, 0, 0], [0.6, 0.8, 0]], [[0, 0, 1.0], [1.0, 0, 0]]])
    y_mask = torch.tensor([[True, True], [True, False]])
    got = token_similarity(x, x_mask, y, y_mask)
    # image 0 / caption 0: e0 finds e0 (1), (0.6, 0.8, 0) finds e1 (0.8) -> 0.9; image 0 / caption 1: e2 finds
    # nothing better than 0; image 1 / caption 0: both tokens find only e2 (0, 0); image 1 / caption 1: 1
    assert torch.allclose(got, torch.tensor([[0.9, 0.0], [0.0, 1.0]]))


def test_retrieval_counts_an_identical_caption_as_right():
    x = torch.eye(3)
    y = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # images 0 and 1 swap captions
    assert retrieval(x @ y.T, ["a", "b", "c"]) == (1 / 3, 1 / 3)
    assert retrieval(x @ y.T, ["a", "a", "c"]) == (1.0, 1.0)  # the swapped captions are the same text


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny text checkpoint (Hugging Face dir) trained for a few steps."""
    out = tmp_path_factory.mktemp("base")
    cfg = train_preset("smoke", out_dir=str(out), steps=4, warmup=1, eval_every=4, ckpt_every=4, plots=False)
    return train(cfg)["hf"]


def test_a_fresh_tower_leaves_the_text_model_as_it_was(base):
    text = herd.from_pretrained(base).eval()
    tok = tiny_tokenizer()
    mm, cfg = attach_tower(text, "tiny", tok, seed=3)
    assert (cfg.image_token_index, cfg.boi_token_index) == (tok.specials["<|patch|>"], tok.specials["<|image_start|>"])
    ids = torch.randint(0, 900, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mm.eval()(ids), text(ids))
    with pytest.raises(ConfigError, match="vision preset"):
        attach_tower(text, "nope", tok, 0)


def _stage(out, stage, init, **kw):
    preset = {"contrastive": "vision-contrastive", "contrastive-tokens": "vision-contrastive",
              "align": "vision-align"}[stage]
    if stage == "contrastive-tokens":
        kw = {"contrastive_pool": "tokens", **kw}
    base = dict(out_dir=str(out), init=str(init), steps=6, warmup=1, batch_size=6, eval_every=3, eval_batches=1,
                ckpt_every=2, log_every=1, plots=False, export=False, samples=False, scene_eval=0)
    return train_preset(preset, **{**base, **kw})


def _weights(run):
    return ckpt.load(ckpt.latest(run / "ckpt"))


@pytest.mark.parametrize("stage", ["contrastive", "contrastive-tokens", "align"])
def test_each_stage_freezes_the_decoder_and_resumes_exactly(base, tmp_path, stage):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = {"vision": "tiny", "freeze": "decoder"}  # the tower trains too (vision-align's default freezes it)
    train(_stage(full, stage, base, **extra))
    train(_stage(part, stage, base, max_steps=2, **extra))
    train(_stage(part, stage, base, **extra), resume=True)
    a, b = _weights(full), _weights(part)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    if stage.startswith("contrastive"):  # the loss's own scale and bias are saved and restored
        assert a["state"]["objective"].keys() == {"log_scale", "bias"}
        assert all(torch.equal(a["state"]["objective"][k], b["state"]["objective"][k]) for k in ("log_scale", "bias"))
        assert float(a["state"]["objective"]["bias"]) != -10.0  # it learnt
    text = herd.from_pretrained(base)
    for k, v in text.state_dict().items():  # frozen: bitwise the checkpoint it started from
        assert torch.equal(a["model"][f"language_model.{k}"], v), k
    for k, v in ckpt.expert_biases(text).items():  # and it routes as it did: no bias updates either
        assert torch.equal(a["state"]["expert_bias"][f"language_model.{k}"], v), k
    start = attach_tower(herd.from_pretrained(base), "tiny", tiny_tokenizer(), seed=0)[0].state_dict()
    moved = [k for k in start if k.startswith(("vision_model.", "multi_modal_projector.")) and
             not torch.equal(start[k], a["model"][k])]
    assert len(moved) > 10  # the tower, adapter and projector did train
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    if stage.startswith("contrastive"):
        assert {"val_i2t", "val_t2i", "val_loss"} <= set(recs[-1])


def test_freezing_the_tower_trains_only_adapter_and_projector(base, tmp_path):
    out = tmp_path / "ap"
    train(_stage(out, "align", base, vision="tiny", freeze="decoder,tower", steps=2, max_steps=2))
    start = attach_tower(herd.from_pretrained(base), "tiny", tiny_tokenizer(), seed=0)[0]
    after = _weights(out)["model"]
    names = {name: [n for n, p in start.named_parameters() if any(p is q for q in ps)]
             for name, ps in parts(start).items()}
    sd = start.state_dict()
    for part, keys in names.items():
        changed = [k for k in keys if not torch.equal(sd[k], after[k])]
        assert (len(changed) > 0) == (part in ("adapter", "projector")), (part, changed[:3])


def test_the_contrastive_export_loads_in_transformers(base, tmp_path):
    summary = train(_stage(tmp_path / "c", "contrastive", base, vision="tiny", steps=2, export=True))
    assert transformers_logit_gap(summary["hf"]) < 1e-4


def test_stage_settings_are_checked(base, tmp_path):
    with pytest.raises(ConfigError, match="text-only model; set vision"):
        train(_stage(tmp_path / "x", "align", base))
    with pytest.raises(ConfigError, match="'eyes': not a vision preset"):
        train(_stage(tmp_path / "z", "align", base, vision="eyes"))
    with pytest.raises(ConfigError, match="only the attention geometry"):
        train(_stage(tmp_path / "y", "align", base, vision="tiny", model_overrides={"hidden_size": 128}))
    with pytest.raises(ValueError, match="freeze takes"):
        train_preset("vision-align", freeze="decoder,eyes")


def test_attention_shares_come_from_the_probabilities_sdpa_used():
    import torch.nn.functional as F

    from herd.train.vision_diagnostics import attention_probs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads, 2 kv heads
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with attention_probs() as seen:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out2 = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert F.scaled_dot_product_attention is not None and len(seen) == 2
    vv = v.repeat_interleave(2, dim=1)
    for p, o in zip(seen, (out, out2), strict=True):
        assert torch.allclose(p @ vv, o, atol=1e-5)  # the recorded probabilities reproduce SDPA's output
        assert torch.allclose(p.sum(-1), torch.ones(1, 4, 6))


def test_look_report_on_a_multimodal_model():
    from herd.train.samples import chance
    from herd.train.vision_diagnostics import feature_stats, look_report

    model = herd.build_model(herd.multimodal_preset("tiny", attention_chunk_size=128), seed=0).eval()
    tok = tiny_tokenizer()
    rep = look_report(model, tok, model.vision_config, seed=0, n=4, size=56)
    assert {"scene_right", "scene_other", "scene_chance", "image_norm", "text_norm", "image_spread"} <= set(rep)
    layers = [rep[f"attn_image_L{i}"] for i in range(model.text_config.num_hidden_layers)]
    assert all(0 < s < 1 for s in layers)  # a 128-token chunk: every layer sees the image
    assert 0 < chance(0, 40, 56) < 1
    same = [scene_chat(7, 0, "qa", size=56, max_shapes=4)] * 3  # one image three times: no spread
    assert feature_stats(model, tok, model.vision_config, same)["image_spread"] < 1e-6


def test_accuracy_by_question_family():
    from herd.data.synthetic import FAMILIES, make_scene, question_family
    from herd.train.samples import chance, family_accuracy, held_out_scenes, question_only_answers

    assert {question_family(q) for i in range(50) for q, _ in make_scene(3, i, 56, 4).qa} == set(FAMILIES)
    with pytest.raises(ValueError, match="not a scene question"):
        question_family("Describe the image.")
    n = 60
    scenes = held_out_scenes(0, n, 56)[:n]
    want = [m[1]["content"] for _, m in scenes]
    # right image always right; other image right only on the count questions
    counts = [question_family(next(p["text"] for p in m[0]["content"] if p["type"] == "text")) == "count"
              for _, m in scenes]
    answers = [(w, w if c else "nope", w) for w, c in zip(want, counts, strict=True)]
    table = family_accuracy(answers, 0, 56)
    assert sum(f["questions"] for f in table.values()) == n and set(table) <= set(FAMILIES)
    assert all(f["right"] == 1.0 for f in table.values())
    assert table["count"]["other"] == 1.0 and all(f["other"] == 0.0 for k, f in table.items() if k != "count")
    overall = sum(f["question_only"] * f["questions"] for f in table.values()) / n  # the families add up to chance
    assert abs(overall - chance(0, n, 56)) < 1e-9
    assert len(question_only_answers(0, n, 56)) == n


def test_caption_embeddings_ignore_the_padding():
    """A caption's embedding is the same alone and right-padded in a batch, for both text sides."""
    from herd.train.contrastive import caption_means

    decoder = herd.build_model(herd.preset("tiny"), seed=0).eval()
    long, short = [5, 9, 77, 300, 41, 8], [12, 600, 3]
    ids = torch.tensor([long, short + [0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        for text in ("embeddings", "hidden"):
            batch = caption_means(decoder, ids, mask, text)
            alone = caption_means(decoder, torch.tensor([short]), torch.ones(1, 3, dtype=torch.long), text)
            assert torch.allclose(batch[1], alone[0], atol=1e-6), text
    assert not torch.allclose(caption_means(decoder, ids, mask, "hidden"), caption_means(decoder, ids, mask))


def test_caption_batches_from_a_jsonl_of_image_text_records(tmp_path):
    """Users' {"image", "text"} records: every image with its own caption, each epoch in a fresh order, resumable;
    a record without a caption is named."""
    from herd.data.sources import DataError
    from herd.data.synthetic import make_scene
    from herd.train.contrastive import CaptionBatches

    lines = []
    for i in range(4):
        scene = make_scene(3, i, 56, max_shapes=4)
        scene.image.save(tmp_path / f"s{i}.png")
        lines.append(json.dumps({"image": f"s{i}.png", "text": scene.caption}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = train_preset("vision-contrastive", image_data=str(tmp_path / "pairs.jsonl"), batch_size=4)
    vcfg = herd.multimodal_preset("tiny").vision_config
    batches = CaptionBatches(cfg, tiny_tokenizer(), vcfg)
    first = next(batches)
    assert sorted(first["captions"]) == sorted(json.loads(x)["text"] for x in lines)  # one epoch: each once
    assert first["image_tiles"].tolist() == [5] * 4 and first["pixel_values"].shape[0] == 20  # 2x2 + thumbnail
    assert first["caption_ids"].shape[0] == 4 and first["caption_mask"].sum() > 0
    again = CaptionBatches(cfg, tiny_tokenizer(), vcfg)
    again.load_state_dict(batches.state_dict())
    assert next(again)["captions"] == next(batches)["captions"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "s0.png", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}) + "\n")
    with pytest.raises(DataError, match="needs a caption"):
        next(CaptionBatches(cfg.replace(image_data=str(tmp_path / "bad.jsonl"), batch_size=1), tiny_tokenizer(),
                            vcfg))
