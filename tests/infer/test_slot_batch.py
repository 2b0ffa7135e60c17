"""The engine on the fixed-shape batch layout (herd.infer.slot_batch.SlotBatch): the same tokens as the left-padded
layout and transformers, bounded chunked rows, no host reads in a step (what a CUDA graph capture needs), rows freed
and reused.

The tiny preset has 16-token attention chunks and temperature tuning from position 8 on, so every test crosses ring
wrap-arounds and depends on positions being each row's own. CUDA cases run where a GPU is present (graphs captured
and replayed); the CPU-only CI runs the same step eagerly.
Run: .venv/bin/python -m pytest tests/infer/test_slot_batch.py -v
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import herd
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.infer.slot_batch import SlotBatch
from herd.model.slot_cache import SlotCache
from herd.tokenizer import tiny_tokenizer
from tests.conftest import image_request, twin_models

GREEDY = dict(temperature=0.0, ignore_eos=True)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # no cuda case to run on CPU CI, none skipped

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 900, (n,), generator=g).tolist() for n in lengths]


def slot_engine(model, tok, max_batch=32, capacity=256, cuda_graphs=None, compile=False, **kw):
    """The engine on a SlotBatch layout (what `herd serve --compile / --cuda-graphs` builds)."""
    return Engine(model, tok, layout=SlotBatch(model, max_batch, capacity, cuda_graphs, compile), **kw)


def _run(engine, prompts, new_tokens):
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, **GREEDY)) for p, n in zip(prompts, new_tokens,
                                                                                           strict=True)]
    engine.run()
    return reqs


def test_one_request_equals_transformers_generate(tok):
    cfg = herd.preset("tiny")
    ours, ref = twin_models(cfg, seed=5)
    prompt = _prompts([21])[0]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=60, min_new_tokens=60, do_sample=False,
                            pad_token_id=0)[0, 21:].tolist()
    engine = slot_engine(ours, tok, max_batch=2, capacity=16, prefill_chunk=8)  # grows 16 -> 32 -> 64 -> 128
    assert _run(engine, [prompt], [60])[0].output_ids == expected
    assert engine.layout.cache.capacity == 128


@pytest.mark.parametrize("device", DEVICES)
def test_continuous_batching_equals_the_left_padded_engine(tok, device):
    """Rows join, leave and are reused while others run; every request gets the tokens herd's engine gives it. On
    a GPU in float32 the MoE layers would read expert counts back to the host (no float32 grouped matmul there), so
    the CUDA case is a dense model, whose step is captured."""
    cfg = herd.preset("tiny", **({"moe_layers": []} if device == "cuda" else {}))
    model = herd.build_model(cfg, seed=3).to(device)
    prompts = _prompts([5, 30, 17, 9, 40, 3, 22], seed=3)
    new = [50, 12, 33, 70, 20, 45, 9]
    expected = [r.output_ids for r in _run(Engine(model, tok, max_batch=3, prefill_chunk=16), prompts, new)]
    engine = slot_engine(model, tok, max_batch=3, capacity=8, prefill_chunk=16)
    assert [r.output_ids for r in _run(engine, prompts, new)] == expected
    assert engine.layout.free == [0, 1, 2] and not engine.layout.slots
    if device == "cuda":
        assert engine.layout.cuda_graphs and engine.layout.graphs  # captured (no fallback), replayed every later step


if torch.cuda.is_available():  # defined only where it can run: the CPU-only CI has no case to skip

    def test_a_captured_moe_step_replays_what_the_eager_step_computes(tok):
        """bfloat16 MoE on a GPU (the grouped matmul keeps expert counts on the device): the replayed graph gives the
        eager step's logits for the same rows and positions."""
        model = herd.build_model(herd.preset("tiny"), seed=4).to("cuda", torch.bfloat16)
        engine = slot_engine(model, tok, max_batch=4, capacity=64)
        for p in _prompts([7, 20, 12], seed=4):
            engine.submit(p, SamplingParams(max_new_tokens=40, **GREEDY))
        for _ in range(20):
            engine.step()
        assert engine.layout.cuda_graphs and 4 in engine.layout.graphs
        ids, pos = torch.tensor([5, 6, 7, 8], device="cuda"), torch.tensor(engine.lengths + [0], device="cuda")
        with torch.no_grad():
            replayed = engine.layout._replay(ids, pos).clone()
            eager = engine.layout.forward(ids, pos)
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


def test_the_compiled_step_gives_the_same_tokens(tok):
    """torch.compile of the whole step (fullgraph: any graph break would raise), on CPU through inductor's C++
    wrapper, both graphs compiled by warmup(): two rows at different positions cross the 16-token chunks (ring
    wrap-arounds) in the graph for 2 rows; when the second row ends, the first goes on alone in the graph for 1 row
    (where the eager CPU step would loop over experts instead of the grouped operator)."""
    from torch._dynamo.utils import counters

    model = herd.build_model(herd.preset("tiny"), seed=12)
    prompts = _prompts([9, 23], seed=12)
    expected = [r.output_ids for r in _run(Engine(model, tok), prompts, [40, 25])]
    engine = slot_engine(model, tok, max_batch=2, capacity=64, compile=True)
    sizes = []
    engine.warmup(lambda i, n, b: sizes.append((i, n, b)))  # both graphs now, before any request
    assert sizes == [(0, 2, 1), (1, 2, 2)]
    graphs = counters["stats"]["unique_graphs"]
    assert [r.output_ids for r in _run(engine, prompts, [40, 25])] == expected
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while serving
    assert engine.layout.cache.capacity == 64 and engine.layout.compiled  # no growth, no fallback
    engine.submit(prompts[0], SamplingParams(max_new_tokens=5, **GREEDY))
    engine.step()
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        engine.warmup()


def test_a_step_that_cannot_be_compiled_runs_eagerly_with_a_warning(tok):
    """int8 experts loop over experts by their counts (data-dependent): compiling the whole step fails at the first
    decode step; the engine warns, goes on eagerly and the requests get their tokens."""
    from herd.infer.quant import quantize

    model = herd.build_model(herd.preset("tiny"), seed=13)
    quantize(model, bits=8)
    prompts = _prompts([6, 11], seed=13)
    expected = [r.output_ids for r in _run(Engine(model, tok), prompts, [12, 12])]
    engine = slot_engine(model, tok, max_batch=2, compile=True)
    with pytest.warns(UserWarning, match="could not be compiled"):
        assert [r.output_ids for r in _run(engine, prompts, [12, 12])] == expected
    assert not engine.layout.compiled


def test_an_image_request_equals_generate_alone(tok):
    model = herd.build_model(herd.multimodal_preset("tiny"), seed=11).eval()
    ids, pixels, expected = image_request(model, tok, 25)
    engine = slot_engine(model, tok, max_batch=2, capacity=32)
    text_req = engine.submit(_prompts([30], seed=11)[0], SamplingParams(max_new_tokens=30, **GREEDY))
    engine.step()
    image_req = engine.submit(ids, SamplingParams(max_new_tokens=25, **GREEDY), pixel_values=pixels)
    engine.run()
    assert image_req.output_ids == expected and len(text_req.output_ids) == 30


class HostReads(TorchDispatchMode):
    """Records what reads a tensor's value back to the host (each a sync on a GPU, which a CUDA graph capture
    refuses): the ops that do it or size their output by data, and the Python-side reads (`tolist` does not pass
    through the dispatcher, so those methods are wrapped while the mode is on)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2", "equal")
    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.seen, self._saved = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def _wrap(self, name):
        method = self._saved[name]

        def read(tensor, *args, **kwargs):
            self.seen.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return read

    def __enter__(self):
        for name in self.METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def test_a_decode_step_never_reads_back_to_the_host(tok):
    cfg = herd.preset("tiny")
    engine = slot_engine(herd.build_model(cfg, seed=4), tok, max_batch=4, capacity=64)
    for p in _prompts([7, 20, 12], seed=4):
        engine.submit(p, SamplingParams(max_new_tokens=40, **GREEDY))
    for _ in range(20):  # past the first ring wrap-around of the chunked layers
        engine.step()
    ids, pos = torch.tensor([5, 6, 7, 8]), torch.tensor(engine.lengths + [0])
    with torch.no_grad(), HostReads() as reads:
        logits = engine.layout.forward(ids, pos)
    assert logits.shape == (4, cfg.vocab_size) and reads.seen == []
    with torch.no_grad(), HostReads() as reads:  # not blind: one row on CPU loops over experts, reading counts
        engine.layout.forward(ids[:1], pos[:1])
    assert "Tensor.tolist" in reads.seen


def test_rows_are_freed_at_once_and_the_lowest_is_reused(tok):
    cfg = herd.preset("tiny")
    engine = slot_engine(herd.build_model(cfg, seed=9), tok, max_batch=3, capacity=64)
    a, b, c = [engine.submit(p, SamplingParams(max_new_tokens=50, **GREEDY)) for p in _prompts([6, 14, 10], seed=9)]
    engine.step()
    assert engine.layout.slots == [0, 1, 2] and engine.layout.free == []
    engine.cancel(b)
    assert b.finish_reason == "cancelled" and engine.layout.slots == [0, 2] and engine.layout.free == [1]
    d = engine.submit(_prompts([4], seed=1)[0], SamplingParams(max_new_tokens=5, **GREEDY))
    engine.step()
    assert engine.running == [a, c, d] and engine.layout.slots == [0, 2, 1]
    engine.run()
    assert c.output_ids == Engine(engine.model, tok).generate([c.prompt_ids], c.params)[0].output_ids


def test_chunked_rows_are_a_ring_of_the_chunk_size():
    """A chunked layer keeps C slots per row however long the request; the global layers' capacity is what was
    asked for, and a prefill that breaks a layer's bound is refused with the layer named."""
    cfg = herd.preset("tiny")
    C, G, D = cfg.attention_chunk_size, cfg.num_key_value_heads, cfg.head_dim
    cache = SlotCache(cfg, rows=2, capacity=64, device="cpu", dtype=torch.float32)
    assert [k.shape[2] for k in cache.k] == [C if c else 64 for c in cache.chunked]
    assert cache.nbytes() == 2 * sum(2 * G * D * 4 * k.shape[2] for k in cache.k)
    keys = [torch.randn(G, min(40, C - 1) if c else 40, D) for c in cache.chunked]
    cache.load(1, keys, keys, 40)
    held = cache.slot_pos[1]
    assert sorted(held[held >= 0].tolist()) == list(range(40 - (C - 1), 40))  # the last C - 1 positions
    masks = cache.begin(torch.tensor([0, 40]))
    assert masks[True][1, 0, 0].sum() == 40 % C + 1  # position 40 sees its own chunk: 32 .. 40
    assert masks[False][1, 0, 0].sum() == 41
    with pytest.raises(ValueError, match="layer 0 is chunked"):
        cache.load(0, [torch.randn(G, C, D)] * len(keys), [torch.randn(G, C, D)] * len(keys), C)
    with pytest.raises(ValueError, match="grow it first"):
        cache.load(0, keys, keys, 65)
    with pytest.raises(ValueError, match="cuda_graphs needs a model on a CUDA device"):
        slot_engine(herd.build_model(cfg, seed=0), tiny_tokenizer(), cuda_graphs=True)
