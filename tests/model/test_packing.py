"""Packed training rows (document masking) and the load-balancing bias, at the model level.

Run: .venv/bin/python -m pytest tests/model/test_packing.py -v
"""

from __future__ import annotations

import torch

import herd
from herd.model.layout import doc_positions


def test_doc_positions():
    d = torch.tensor([[7, 7, 7, 9, 9, 4], [1, 1, 1, 1, 1, 1]])
    assert doc_positions(d).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_documents_see_only_themselves():
    """Logits of a packed row equal each document run alone: no attention across documents, and positions, chunks
    and the attention temperature restart per document (chunk 16 and floor_scale 8 are exceeded here)."""
    cfg = herd.preset("tiny")
    model = herd.build_model(cfg, seed=11).eval()
    g = torch.Generator().manual_seed(11)
    lengths = [37, 5, 22]
    docs = [torch.randint(0, 900, (1, n), generator=g) for n in lengths]
    row = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() < 1e-5
    with torch.no_grad():  # without the doc mask the later documents would see the earlier ones
        assert (model(row) - alone).abs().max().item() > 1e-3


def test_expert_bias_moves_choice_not_weight():
    cfg = herd.preset("tiny")
    model = herd.build_model(cfg, seed=12).eval()
    router = model.model.layers[0].feed_forward.router
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        idx0, w0, logits = router(x)
        router.expert_bias[2] = 100.0  # expert 2 now always wins the selection
        idx1, w1, _ = router(x)
    assert (idx1 == 2).all() and not (idx0 == 2).all()
    assert torch.allclose(w1[:, 0], torch.sigmoid(logits[:, 2]), atol=1e-7)  # weight: the unbiased sigmoid score
    fresh = herd.build_model(cfg, device="meta")
    herd.materialize(fresh, "cpu")
    assert all(float(layer.feed_forward.router.expert_bias.abs().sum()) == 0 for layer in fresh.model.layers)
