"""What a training run reads: its text documents, its tokenizer, and rows of image-text chats.

Text (`documents`): the `data` sources joined by "+", packed into rows by herd.data.packing.Packer in the trainer.

Image-text (`ImageRows`): with `image_rows` > 0 every micro-batch also carries that many chat rows, each one
conversation with an image, run through the multimodal model in their own forward pass (rows of their own length,
so a 64-token text context does not have to hold an image's tokens). The source (`image_data`) is "scenes", the
synthetic shape scenes of herd.data.synthetic generated on the fly from the seed (captions, questions, boxes: what
teaches a tiny model to look), or a JSONL file of image-text records (herd.data.sources.image_text_records). Only
the assistant's answers are targets: the prompt, the image tokens and the chat scaffolding predict nothing, as in
supervised chat training. Rows are padded at the end to the longest row of the batch (padding is never a target
and, causal attention being what it is, is never attended to by a real token). The position in the stream is a
plain counter, saved with the checkpoint, so resuming continues with the same rows.
"""

from __future__ import annotations

import torch

from herd.data.sources import DataError

IGNORE = -100
VAL_OFFSET = 10**6  # validation scenes use seeds of their own


def pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut into consecutive pieces of at most about max_chars, at paragraph breaks where there are any, else at
    a space (0: the text whole). Every character is kept (joining the pieces gives the text back)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        for sep in ("\n\n", "\n", " "):  # the latest break of the best kind in the window's second half
            k = window.rfind(sep)
            if k > max_chars // 2:
                cut = k + len(sep)
                break
        else:
            cut = max_chars
        out.append(text[start:start + cut])
        start += cut
    return out + [text[start:]]


def documents(cfg, split: str) -> list[str]:
    """The run's documents: `data` is sources joined by '+' - "builtin" (the shipped corpus), a .txt / .jsonl file
    or folder, "hf:NAME" (the "text" column of a Hugging Face dataset's train split: a hub name, or a local folder
    or data file as `datasets.load_dataset` takes it; needs `pip install datasets`) - of which every 20th document,
    or a lone document's last 5%, is held out for validation - and the long-context tasks "passkey" / "kv"
    (herd.data.synthetic: one retrieval document of about seq_len tokens, question and answer appended, per 10
    documents of the other sources)."""
    docs, synthetic = [], []
    for source in cfg.data.split("+"):
        if source == "builtin":
            from herd.data.corpus import documents as corpus

            docs += corpus(split)
        elif source in ("passkey", "kv"):
            synthetic.append(source)
        else:
            from herd.data.sources import hf_documents, load_documents

            mine = hf_documents(source[3:]) if source.startswith("hf:") else load_documents(source)
            if len(mine) == 1:
                cut = int(len(mine[0]) * 0.95)
                docs.append(mine[0][:cut] if split == "train" else mine[0][cut:])
            else:
                docs += [d for i, d in enumerate(mine) if (i % 20 == 19) == (split == "val")]
    # Long documents (a whole play is 70k tiny-tokenizer tokens) are cut into pieces, each packed as a document of its
    # own: training batches then mix the corpus's works instead of walking through one for tens of steps, and the few
    # fixed validation batches sample about one row from each of many places of the held-out text instead of three
    # documents (val pieces of ~1.5 rows; the first tokens of a piece have less context, in every evaluation alike).
    limit = cfg.max_doc_chars if split == "train" else min(cfg.max_doc_chars, 4 * cfg.seq_len)
    docs = [p for d in docs for p in pieces(d, limit)]
    if synthetic:
        from herd.data import synthetic as syn

        n, base = max(len(docs) // 10, 1), 0 if split == "train" else VAL_OFFSET
        for kind in synthetic:
            make = syn.passkey_document if kind == "passkey" else syn.kv_document
            for i in range(n):  # ~2.4 bytes per tiny-tokenizer token: 2 characters per position fill most of a row
                r = make(cfg.seed + base + i, n_chars=max(2 * cfg.seq_len, 600))  # 600: the shortest that fits
                docs.append(f"{r.text}\n\n{r.question} {r.answer}")
    return docs


def tokenizer(cfg):
    from herd.tokenizer import Tokenizer, tiny_tokenizer

    return tiny_tokenizer() if cfg.tokenizer == "tiny" else Tokenizer.from_pretrained(cfg.tokenizer)


def token_bytes_table(tok, vocab_size: int) -> torch.Tensor:
    """(V,) UTF-8 byte length of every id; 0 for special tokens and ids the tokenizer lacks."""
    special = set(tok.specials.values())
    n = min(tok.vocab_size, vocab_size)
    return torch.tensor([0 if i in special else len(tok.token_bytes(i)) for i in range(n)] + [0] * (vocab_size - n))


def chat_example(messages: list[dict], tok, vcfg, max_len: int, where: str = "record",
                 tools: list[dict] | None = None, template: str | None = None) -> tuple[list, list, object]:
    """(ids, labels, ImageBatch) of one conversation: labels[t] = ids[t + 1] where that token belongs to an
    assistant turn (its text or tool calls, and its end-of-turn token), else IGNORE. `tools`: the OpenAI function
    specs the chat shows (rendered into the first user turn; herd.post.sft_data). `template`: a Jinja chat template
    to render instead of herd's format (herd.chat.default_template). An answer's tokens are the ones the whole
    conversation adds to the prompt that asks for it (the conversation up to it with the generation prompt), so
    the renderings must agree on that prefix: a template that rewrites earlier turns is refused, not mislabelled."""
    from herd.chat import collect_images, format_chat, prepare_chat, tiling

    kw = tiling(vcfg)
    ids, batch = prepare_chat(messages, tok, add_generation_prompt=False, tools=tools, template=template, **kw)
    if len(ids) > max_len:
        raise DataError(f"{where}: the chat takes {len(ids)} tokens (image tokens included), more than "
                        f"image_seq_len={max_len}; raise image_seq_len or use smaller images")
    grids = batch.grids if batch is not None else []
    per_tile = vcfg.tokens_per_tile if vcfg is not None else 144  # text-only model: no image tokens anyway
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        n_img = len(collect_images(messages[:k]))  # the images shown before this answer
        prompt = format_chat(messages[:k], tok, True, grids[:n_img], per_tile, tools, template=template)
        upto = format_chat(messages[: k + 1], tok, False, grids[:n_img], per_tile, tools, template=template)
        if ids[:len(prompt)] != prompt or ids[:len(upto)] != upto:
            raise DataError(f"{where}: message {k} (assistant): the chat template renders the conversation up to "
                            "this answer differently from the same turns inside the whole conversation, so its "
                            "tokens cannot be told apart; train on a template whose earlier turns do not change "
                            "as the conversation grows")
        for t in range(len(prompt), len(upto)):
            labels[t - 1] = ids[t]
    return ids, labels, batch


class EpochOrder:
    """Item i of an endless stream over n records, read in a fresh seeded order every epoch (drawn once per
    epoch, so a position in the stream is all a resumed run needs)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._order = n, seed, -1, []

    def index(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._order[i % self.n]


class RecordStream:
    """A JSONL of image records (cfg.image_data, herd.data.sources.image_text_records) as an endless stream for one
    split: every 20th record is held out for validation (all of them serve when there are fewer than 20), and record
    i of the stream is drawn in a fresh order every epoch."""

    def __init__(self, image_data: str, split: str, seed: int):
        from herd.data.sources import image_text_records

        records = image_text_records(image_data)
        self.records = [r for i, r in enumerate(records) if (i % 20 == 19) == (split == "val")] or records
        self.order = EpochOrder(len(self.records), seed)

    def __getitem__(self, i: int) -> dict:
        return self.records[self.order.index(i)]


def record_stream(cfg, split: str, seed: int) -> RecordStream | None:
    """cfg.image_data's records for `split`, or None when the images are the built-in scenes."""
    return None if cfg.image_data == "scenes" else RecordStream(cfg.image_data, split, seed)


class ImageRows:
    """Batches of image-text chat rows: {"input_ids", "labels" (B, T), "pixel_values" (tiles, 3, H, W)}."""

    def __init__(self, cfg, tok, vcfg, split: str = "train", rank: int = 0, world_size: int = 1):
        self.tok, self.vcfg, self.rows, self.max_len = tok, vcfg, cfg.image_rows, cfg.image_seq_len
        self.seed = cfg.seed + (VAL_OFFSET if split == "val" else 0)
        self.size, self.task = cfg.scene_size, cfg.scene_task
        self.rank, self.world, self.index = rank, world_size, 0
        self.records = record_stream(cfg, split, self.seed)  # None: the built-in scenes
        pad = tok.pad_token or "<|finetune_right_pad|>"
        self.pad_id = tok.specials[pad]

    def _messages(self, i: int) -> tuple[list[dict], str]:
        if self.records is None:
            from herd.data.synthetic import scene_chat

            return scene_chat(self.seed, i, self.task, size=self.size, max_shapes=4)[1], f"scene {i}"
        rec = self.records[i]
        return rec["messages"], rec["image"]

    def __iter__(self) -> ImageRows:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        ids, labels, pixels = [], [], []
        for _ in range(self.rows):
            i = self.index * self.world + self.rank  # each rank reads its own share of the stream
            self.index += 1
            messages, where = self._messages(i)
            row, lab, batch = chat_example(messages, self.tok, self.vcfg, self.max_len, where)
            ids.append(row), labels.append(lab)
            if batch is not None:
                pixels.append(batch.pixel_values)
        T = max(len(r) for r in ids)
        out = {"input_ids": torch.tensor([r + [self.pad_id] * (T - len(r)) for r in ids]),
               "labels": torch.tensor([r + [IGNORE] * (T - len(r)) for r in labels])}
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
