"""Does a multimodal model look? What a run reports at every evaluation when `scene_eval` > 0, and plots.

- `scene_right` / `scene_other`: held-out scene questions answered with the scene's own image and with the next
  scene's image (herd.train.samples.scene_accuracy); `scene_chance` (samples.chance): the accuracy of answering
  each of those questions with the answer most common for that question in 4000 training scenes - the best a model
  that reads only the question can expect. A model that looks scores well above it with the right image and near
  (or below) it with the wrong one.
- herd.train.samples.family_accuracy: the same three accuracies per question family (counts, colour of a shape,
  shape of a colour, left/right, above/below), printed at the end of a run: which families the image helps says
  what its features carry.
- Feature statistics of the projected image tokens (what fills the `<|patch|>` positions) against the decoder's
  text embeddings: `image_norm` and `text_norm` (mean L2 norm per token) and `image_spread`, the mean distance of an
  image's token from the mean over 16 images at the same position, over the mean norm: 0 when every image gives
  the same features (the collapse this stage set out to fix: norms near 170 against 0.3, spread 0.02).
- `attn_image_L{i}`: per decoder layer, the share of attention that the position predicting the answer's first
  token puts on the image's tokens (mean over heads and questions), read by recomputing each attention's
  probabilities from the same q, k and mask torch's SDPA receives (`attention_probs`), not from a second model.
herd.train.plots draws them (look.png).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def attention_probs():
    """Record, for every attention call inside the block, the probabilities (B, H, T, K) that SDPA computes from
    its q, k, mask and scale (herd.model.attention calls it once per layer, in layer order)."""
    real, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **kw):
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if enable_gqa else k
        scores = (q.float() @ kk.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)  # (B, H, T, K)
        if is_causal:
            T, K = scores.shape[-2:]
            attn_mask = torch.ones(T, K, dtype=torch.bool, device=q.device).tril(K - T)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        seen.append(scores.softmax(-1))
        return real(q, k, v, attn_mask=attn_mask if not is_causal else None, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, **kw)

    F.scaled_dot_product_attention = spy
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = real


@torch.no_grad()
def image_attention(model, tok, vcfg, scenes: list[tuple]) -> list[float]:
    """Per layer: the mean share of attention the last prompt position puts on `<|patch|>` tokens."""
    from herd.chat import prepare_chat, tiling

    shares = None
    device = next(model.parameters()).device
    for _, messages in scenes:
        ids, batch = prepare_chat(messages[:1], tok, **tiling(vcfg))
        x = torch.tensor([ids], device=device)
        embeds = model.fuse(x, batch.pixel_values.to(device))  # the tower's own attention stays out of the record
        with attention_probs() as probs:
            model.language_model(x, inputs_embeds=embeds)
        is_image = (x[0] == model.image_token_index).float()  # (T,)
        layer = [float((p[0, :, -1, :] * is_image).sum(-1).mean()) for p in probs]  # heads' mean share
        shares = layer if shares is None else [a + b for a, b in zip(shares, layer, strict=True)]
    return [s / len(scenes) for s in shares]


@torch.no_grad()
def feature_stats(model, tok, vcfg, scenes: list[tuple]) -> dict:
    """image_norm, text_norm and image_spread (module docstring) over the scenes' images."""
    from herd.chat import prepare_chat, tiling

    device = next(model.parameters()).device
    feats = []
    for _, messages in scenes:
        _, batch = prepare_chat(messages[:1], tok, **tiling(vcfg))
        feats.append(model.image_features(batch.pixel_values.to(device)).float())  # (tiles * K, D)
    f = torch.stack(feats)  # (n, tiles * K, D): same-size scenes tile alike
    emb = model.decoder.model.embed_tokens.weight.float()
    norm = float(f.norm(dim=-1).mean())
    return {"image_norm": norm, "text_norm": float(emb.norm(dim=-1).mean()),
            "image_spread": float((f - f.mean(0)).norm(dim=-1).mean()) / max(norm, 1e-12)}


def look_report(model, tok, vcfg, seed: int, n: int, size: int) -> dict:
    """Every figure of the module docstring, for a run's evaluation (scene_* accuracies over n questions)."""
    from herd.train.samples import chance, held_out_scenes, scene_accuracy

    was = model.training
    model.eval()
    acc = scene_accuracy(model, tok, vcfg, seed, n=n, size=size)
    scenes = held_out_scenes(seed, 16, size)[:16]
    out = {"scene_right": acc["scene_qa_accuracy"], "scene_other": acc["scene_qa_accuracy_other_image"],
           "scene_chance": chance(seed, n, size), **feature_stats(model, tok, vcfg, scenes)}
    out |= {f"attn_image_L{i}": s for i, s in enumerate(image_attention(model, tok, vcfg, scenes))}
    model.train(was)
    return out
