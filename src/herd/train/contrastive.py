"""Contrastive pretraining of the vision tower against the frozen language model: `herd train --preset
vision-contrastive --init BASE`.

Llama 4's vision encoder is MetaCLIP-based and was "trained separately in conjunction with a frozen Llama model"
("The Llama 4 herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/). herd's first vision stage trains
the tower the CLIP way on image-caption pairs, with the frozen decoder as the text side:
- image embedding: the tower, pixel-shuffle adapter and projector (exactly what the decoder will read at its
  `<|patch|>` positions), mean-pooled over every token of every tile of the image, L2-normalised;
- caption embedding: the mean of the frozen decoder's input embeddings of the caption's tokens, minus the mean
  caption embedding of a fixed sample of training captions, L2-normalised. Centring matters: a small language
  model's token embeddings share one large common direction (two random scene captions are at cosine 0.83 before
  centring, 0.08 after), and without it the loss is lowered by sending every image to that direction (the tower
  collapses; measured).
The decoder is frozen (`freeze=decoder`, forced), so the tower learns to put images where the decoder's own word
embeddings are: the same space the early-fused image tokens land in. Its final hidden states
(`contrastive_text=hidden`) retrieve better but made no difference to how well the model later looks, and cost a
decoder forward per caption (measured: docs/vision.md).

Losses (`contrastive_loss`), over a batch of B pairs with image embeddings x and caption embeddings y:
- "sigmoid" (SigLIP, Zhai et al. 2023, arXiv:2303.15343): -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ii = 1,
  z_ij = -1 otherwise; t = exp(t'), t' learned from log 10, b learned from -10 (the paper's initialisation);
- "softmax" (CLIP, Radford et al. 2021, arXiv:2103.00020): the mean of the image->text and text->image
  cross-entropies of t x.y, t' learned from log(1 / 0.07).
Stats: in-batch retrieval accuracy both ways (`i2t`, `t2i`); a retrieved caption identical to the right one counts
as right (synthetic scenes repeat: "One shape on a white background: a red circle." is one caption for many
images). Validation reports them on held-out pairs as `val_i2t` / `val_t2i`: zero-shot retrieval.

Data (`image_data`): the synthetic scenes (herd.data.synthetic; the caption lists the objects left to right) or a
JSONL of {"image", "text"} records (herd.data.sources.image_text_records; the assistant's text is the caption);
validation uses held-out scenes / every 20th record. The scale and bias are saved with the checkpoint (exact
resume); the centre is recomputed from the frozen decoder, so it is the same bits every time. One process only:
the scale and bias live outside the model, which FSDP2's state-dict helpers do not know about.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.data.sources import DataError
from herd.train.inputs import VAL_OFFSET, record_stream

CENTRE_CAPTIONS = 512  # training captions whose mean embedding is the centre


# ---- the losses ----------------------------------------------------------------------------------------------------
def sigmoid_loss(sim: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss of the (B, B) image-caption similarities sim (pair i is sim[i, i]; cosines, in [-1, 1])."""
    logits = sim * log_scale.exp() + bias
    z = 2 * torch.eye(len(sim), device=sim.device, dtype=logits.dtype) - 1  # +1 on the matching pairs, -1 elsewhere
    return -F.logsigmoid(z * logits).sum() / len(sim)


def softmax_loss(sim: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss of the (B, B) image-caption similarities sim."""
    logits = sim * log_scale.exp()
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def token_similarity(x: torch.Tensor, x_mask: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) token-wise late-interaction similarity (FILIP, Yao et al. 2021, arXiv:2111.07783, its text-to-image
    direction): for image i and caption j, each of the caption's tokens takes its best-matching image token, and the
    cosines are averaged over the caption. x (B, N, D) unit-norm image tokens with x_mask (B, N); y (B, L, D)
    unit-norm caption tokens with y_mask (B, L). Unlike the pooled similarity this scores every word against one
    place in the image, so the tower is pushed to put each object's words on that object's tokens."""
    cos = torch.einsum("ind,jld->ijnl", x, y)  # (B_img, B_cap, N, L)
    cos = cos.masked_fill(~x_mask[:, None, :, None], -2.0)  # padding tokens never win the max
    best = cos.amax(2)  # (B_img, B_cap, L)
    m = y_mask.to(best.dtype)[None]
    return (best * m).sum(-1) / m.sum(-1).clamp(min=1)


def retrieval(sim: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy of the (B, B) image-caption similarities; an identical caption
    counts as the right one."""
    i2t = sum(captions[int(j)] == captions[i] for i, j in enumerate(sim.argmax(1)))
    t2i = sum(captions[int(i)] == captions[j] for j, i in enumerate(sim.argmax(0)))
    return i2t / len(captions), t2i / len(captions)


# ---- the embeddings ------------------------------------------------------------------------------------------------
def image_embeddings(model, pixel_values: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Unit-norm (B, D): each image's projected vision tokens averaged over all its tiles; `tiles` (B,) counts each
    image's tiles, in the order of `pixel_values` (tiles, 3, H, W)."""
    feats = model.image_features(pixel_values)  # (tiles * K, D)
    per_tile = feats.view(pixel_values.shape[0], -1, feats.shape[-1]).mean(1)  # (tiles, D)
    owner = torch.repeat_interleave(torch.arange(len(tiles), device=feats.device), tiles.to(feats.device))
    sums = torch.zeros(len(tiles), feats.shape[-1], device=feats.device, dtype=feats.dtype).index_add(0, owner,
                                                                                                     per_tile)
    return F.normalize(sums / tiles.to(feats.device)[:, None], dim=-1)


def image_tokens(model, pixel_values: torch.Tensor, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm (B, N, D) projected vision tokens of each image (all its tiles' tokens, right-padded to the longest
    image) and the (B, N) mask of real ones; `tiles` as in image_embeddings."""
    feats = model.image_features(pixel_values)  # (tiles * K, D)
    per_tile = F.normalize(feats, dim=-1).view(pixel_values.shape[0], -1, feats.shape[-1])  # (tiles, K, D)
    K, counts = per_tile.shape[1], [int(t) for t in tiles]
    x = per_tile.new_zeros(len(counts), max(counts) * K, feats.shape[-1])
    mask = torch.zeros(len(counts), max(counts) * K, dtype=torch.bool, device=feats.device)
    start = 0
    for i, n in enumerate(counts):
        x[i, :n * K] = per_tile[start:start + n].reshape(n * K, -1)
        mask[i, :n * K] = True
        start += n
    return x, mask


def caption_states(decoder, ids: torch.Tensor, text: str = "embeddings") -> torch.Tensor:
    """(B, L, D) float32: the decoder's input embeddings of the caption tokens (text="embeddings") or its final
    normed hidden states ("hidden"; right padding is never attended to)."""
    x = decoder.embed(ids)
    if text == "hidden":
        from herd.model.layout import sequence_step

        B, L = ids.shape
        x = decoder.decode(x, sequence_step(B, L, x.device, decoder.config.attention_chunk_size, None, None,
                                            None))[0]
    return x.float()


def caption_means(decoder, ids: torch.Tensor, mask: torch.Tensor, text: str = "embeddings") -> torch.Tensor:
    """(B, D) mean over each caption's tokens (mask (B, L) 1 on real tokens) of caption_states."""
    m = mask.to(torch.float32)[..., None]
    return (caption_states(decoder, ids, text) * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveObjective(nn.Module):
    """The trainer's objective for this stage (herd.train.trainer.train): `outputs(model, batch)` gives the (B, B)
    image-caption similarities (in place of the model's logits), calling the objective on them gives (loss, stats).
    `pool`: "mean" compares each image's mean token with the caption's mean embedding (CLIP/SigLIP), "tokens" matches
    caption tokens to image tokens (token_similarity). Holds the learned scale and bias, and the centre of the
    caption embeddings (computed from the frozen decoder on first use; not saved: the decoder is frozen, so it is
    the same bits every time)."""

    def __init__(self, kind: str = "sigmoid", text: str = "embeddings", pool: str = "mean"):
        super().__init__()
        if kind not in ("sigmoid", "softmax") or text not in ("embeddings", "hidden") or pool not in ("mean",
                                                                                                      "tokens"):
            raise ValueError(f"contrastive_loss must be sigmoid or softmax, contrastive_text embeddings or hidden and "
                             f"contrastive_pool mean or tokens, got {kind!r}, {text!r}, {pool!r}")
        self.kind, self.text, self.pool = kind, text, pool
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0) if kind == "sigmoid" else math.log(1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0), requires_grad=kind == "sigmoid")
        self.centre: torch.Tensor | None = None
        self.centre_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # captions (ids, mask) for the centre

    def outputs(self, model, b: dict) -> torch.Tensor:
        decoder, ids, mask = model.decoder, b["caption_ids"], b["caption_mask"]
        with torch.no_grad():  # the frozen text side
            if self.centre is None:
                sample = tuple(t.to(ids.device) for t in self.centre_batch)
                self.centre = caption_means(decoder, *sample, self.text).mean(0)
            if self.pool == "tokens":
                y = F.normalize(caption_states(decoder, ids, self.text) - self.centre, dim=-1)  # (B, L, D)
            else:
                y = F.normalize(caption_means(decoder, ids, mask, self.text) - self.centre, dim=-1)  # (B, D)
        if self.pool == "tokens":
            x, x_mask = image_tokens(model, b["pixel_values"], b["image_tiles"])
            return token_similarity(x.float(), x_mask, y, mask.to(torch.bool))
        return image_embeddings(model, b["pixel_values"], b["image_tiles"]).float() @ y.T

    def forward(self, sim: torch.Tensor, b: dict) -> tuple[torch.Tensor, dict]:
        if self.kind == "sigmoid":
            loss = sigmoid_loss(sim, self.log_scale, self.bias)
        else:
            loss = softmax_loss(sim, self.log_scale)
        with torch.no_grad():
            i2t, t2i = retrieval(sim, b["captions"])
        return loss, {"i2t": i2t, "t2i": t2i, "scale": float(self.log_scale.detach().exp())}


# ---- the data ------------------------------------------------------------------------------------------------------
class CaptionBatches:
    """Infinite iterator of image-caption batches {"pixel_values" (tiles, 3, H, W), "image_tiles" (B,),
    "caption_ids" (B, L), "caption_mask" (B, L), "captions" [B str]}: `batch_size` pairs, scenes generated from the
    seed or JSONL records in a fresh order each epoch. The position is a counter (state_dict), so a resumed run
    reads on exactly."""

    def __init__(self, cfg, tok, vcfg, split: str = "train", rank: int = 0, world_size: int = 1):
        if vcfg is None:
            raise DataError("contrastive pretraining needs a vision tower: init from a multimodal checkpoint or set "
                            "vision=PRESET to give a text checkpoint a fresh tower")
        self.tok, self.vcfg, self.size, self.batch = tok, vcfg, cfg.scene_size, cfg.batch_size
        self.seed = cfg.seed + (VAL_OFFSET if split == "val" else 0)
        self.rank, self.world, self.index = rank, world_size, 0
        self.records = record_stream(cfg, split, self.seed)  # None: the built-in scenes

    def pair(self, i: int) -> tuple:
        """(image source, caption) number i of the stream."""
        if self.records is None:
            from herd.data.synthetic import make_scene

            scene = make_scene(self.seed, i, self.size, max_shapes=4)
            return scene.image, scene.caption
        rec = self.records[i]
        caption = rec["messages"][-1].get("content")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{rec['image']}: contrastive pretraining needs a caption: a record's \"text\" (or its "
                            "last message's text content)")
        return rec["image"], caption

    def captions(self, pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tok.encode(text) or [self.tok.bos_id] for _, text in pairs]
        L = max(len(r) for r in ids)
        return (torch.tensor([r + [0] * (L - len(r)) for r in ids]),
                torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ids]))

    def __iter__(self) -> CaptionBatches:
        return self

    def __next__(self) -> dict:
        from herd.image import load_image, preprocess

        pairs = []
        for _ in range(self.batch):
            pairs.append(self.pair(self.index * self.world + self.rank))  # each rank reads its own share
            self.index += 1
        images = preprocess([load_image(src) for src, _ in pairs], tile_size=self.vcfg.image_size,
                            max_tiles=self.vcfg.max_tiles)
        ids, mask = self.captions(pairs)
        return {"pixel_values": images.pixel_values, "image_tiles": torch.tensor(images.tiles_per_image),
                "caption_ids": ids,
                "caption_mask": mask, "captions": [text for _, text in pairs]}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def contrastive_stage(cfg, vcfg) -> tuple:
    """The trainer's (rows, objective) for this stage: caption batches, and the objective with its centre sample
    (the first CENTRE_CAPTIONS training captions of seed + 1, a stream the run does not train on first)."""
    objective = ContrastiveObjective(cfg.contrastive_loss, cfg.contrastive_text, cfg.contrastive_pool)

    def rows(cfg_, tok, split, rank=0, world=1):
        batches = CaptionBatches(cfg_, tok, vcfg, split, rank, world)
        if objective.centre_batch is None:
            sample = CaptionBatches(cfg_.replace(seed=cfg_.seed + 1), tok, vcfg)
            objective.centre_batch = sample.captions([sample.pair(i) for i in range(CENTRE_CAPTIONS)])
        return batches

    return rows, objective
