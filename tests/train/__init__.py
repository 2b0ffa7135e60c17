"""Helpers for the training tests: a small slice of the built-in corpus, and transformers' view of an export.

`small_data(monkeypatch)` makes `herd.data.corpus.documents` return the first few documents of the real corpus, cut
short, so every run tokenizes kilobytes, not megabytes. `transformers_logit_gap(hf_dir)` is the largest difference
between herd's and transformers' logits for a multimodal export on a scene chat.
"""

from __future__ import annotations

N_DOCS, DOC_CHARS = 48, 2000


def small_data(monkeypatch) -> None:
    from herd.data import corpus

    full = {s: corpus.documents(s) for s in ("train", "val")}
    docs = {s: [d[:DOC_CHARS] for d in full[s][:N_DOCS]] for s in full}
    monkeypatch.setattr(corpus, "documents", lambda split="train", sources=None: list(docs[split]))


def transformers_logit_gap(hf_dir) -> float:
    """max |herd - transformers| logits of the Llama4ForConditionalGeneration export in hf_dir on a scene question."""
    import torch
    from transformers import Llama4ForConditionalGeneration

    import herd
    from herd.chat import prepare_chat
    from herd.data.synthetic import scene_chat
    from herd.tokenizer import Tokenizer

    ours = herd.from_pretrained(hf_dir).eval()
    theirs = Llama4ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    v = ours.vision_config
    ids, batch = prepare_chat(scene_chat(5, 1, size=56)[1][:1], Tokenizer.from_pretrained(hf_dir),
                              tile_size=v.image_size, max_tiles=v.max_tiles, tokens_per_tile=v.tokens_per_tile)
    ids = torch.tensor([ids])
    with torch.no_grad():
        a = ours(ids, pixel_values=batch.pixel_values)
        b = theirs(input_ids=ids, pixel_values=batch.pixel_values.float()).logits
    return float((a - b).abs().max())
