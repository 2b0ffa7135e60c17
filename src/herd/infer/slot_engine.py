"""The engine with a fixed-shape decode step: every request owns a row of a herd.model.slot_cache.SlotCache.

herd.infer.engine.Engine keeps one left-padded batch cache: rows join by padding and concatenating the whole cache,
leave by copying the rest, and every step's shapes differ. That is the right trade on a CPU, where a step costs its
matrix multiplies. On a GPU a small model's decode step is bound by launching kernels, not by arithmetic (one H200,
bfloat16, the engine benchmark's model: about 5.5 ms a step at batch 1, 8 and 32 alike), and the cure is to capture
the step once as a CUDA graph and replay it (what vLLM and gpt-fast do). A graph replays fixed shapes at fixed
addresses, hence this engine:
- admission, sampling, stops, streaming and cancellation are Engine's; prefill too (eager, left-padded groups into a
  KVCache of their own), after which each request's keys are copied to its row at their real positions (no left
  padding: a row computes what it computes alone);
- a decode step runs rows 0 .. b - 1 of the slot cache, b the smallest capture size (1, 2, 4, ... max_batch) that
  covers every live row; free rows in that range compute garbage nobody reads. A finished request just frees its
  row (nothing is copied), and a new one takes the lowest free row, which keeps b small;
- the global layers' capacity doubles when a row is about to run out (the graphs are then captured again);
- with `cuda_graphs` (default: on when the model is on a CUDA device) each b is captured once, on first use, and
  replayed with the step's ids and positions copied into its input buffers. A model whose step cannot be captured
  (one that reads a value back to the host, e.g. MoE experts on a GPU without a grouped matmul) falls back to the
  eager step with a warning. Without graphs the same step runs eagerly (CPU: tests and the benchmark's A/B);
- with `compile` the step goes through torch.compile first (one graph per batch size and capacity, compiled on first
  use or all at once by `warmup()`: tens of seconds each on a small CPU). On the 2-core CPU it takes the benchmark
  model's batch-8 step from 9.3 to 6.1 ms; on a GPU it fuses the step's small kernels before the capture. A step it
  cannot take whole (quantized experts loop over experts by their counts) runs eagerly, with a warning.

Use: `SlotEngine(model, tokenizer, max_batch=32, compile=False)`, optionally `.warmup()` (compile every batch size
before the first request), then as herd.infer.engine.Engine.
Shapes: b rows in a step, V vocab, D hidden.
"""

from __future__ import annotations

import logging
import warnings

import torch

from herd.infer.engine import Engine
from herd.model.attention import rope_phases
from herd.model.cache import KVCache
from herd.model.slot_cache import SlotCache


def _no_cshim_notes(record: logging.LogRecord) -> bool:
    """Inductor's C++ wrapper notes every view op it calls through its generic path (a few per layer, per compile):
    noise in a server's log, so that one message is dropped."""
    return "missing a c-shim implementation" not in record.getMessage()


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SlotEngine(Engine):
    def __init__(self, model, tokenizer, max_batch: int = 32, capacity: int = 256, cuda_graphs: bool | None = None,
                 compile: bool = False, **kwargs):
        super().__init__(model, tokenizer, max_batch=max_batch, **kwargs)
        self.lm = getattr(model, "language_model", model)  # the text decoder of a multimodal model
        self.slot_cache = SlotCache(self.cfg, max_batch, self._capacity_for(capacity), self.device, self.lm.dtype)
        self.slots: list[int] = []  # slot_cache row of running[r]
        self.free = list(range(max_batch))  # free rows, ascending
        self.inv_freq = self.lm._inv_freq.to(self.device)  # on the device: a capture may not copy from the host
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a model on a CUDA device, not {self.device}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._compiled = self._compile() if compile else None  # the compiled step, or None: eager
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._in_ids = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # the graphs' input buffers
        self._in_pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)

    def _compile(self):
        """torch.compile of the step: whole (fullgraph: a step with a graph break would be slow in pieces; `_call`
        runs it eagerly instead), one graph per (batch size, capacity), the grouped experts an opaque operator
        (herd.model.moe); on CPU with inductor's C++ wrapper, whose per-call cost is far below the Python one's."""
        import torch._dynamo

        logging.getLogger("torch._inductor.ir").addFilter(_no_cshim_notes)  # once per logger: same object
        # one graph per capture size and capacity doubling: more than dynamo's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        return torch.compile(self.forward, fullgraph=True, dynamic=False, options=options)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @torch.no_grad()
    def warmup(self, progress=None) -> None:
        """Compile (and capture) the step for every batch size now, at the current capacity, instead of at first use,
        where it would stall every running request (15-20 s a size on a 2-core CPU). `progress(i, n, b)` is called
        before each size. Only on an idle engine: the dummy steps write position 0 of the rows they run."""
        if self.running:
            raise RuntimeError("warmup() needs an idle engine: its steps would overwrite running rows")
        if not (self.compiled or self.cuda_graphs):
            return
        for i, b in enumerate(self.sizes):
            if progress is not None:
                progress(i, len(self.sizes), b)
            # two tensors, as a real step passes: one for both would compile a graph for aliased inputs
            ids, pos = (torch.zeros(b, dtype=torch.long, device=self.device) for _ in range(2))
            if self.cuda_graphs:
                self._replay(ids, pos)
            else:
                self._call(ids, pos)

    def _capacity_for(self, positions: int) -> int:
        """The next power of two, but no more than the context (and never less than asked)."""
        return max(positions, min(_pow2_at_least(positions), self.cfg.max_position_embeddings))

    # ---- rows ----------------------------------------------------------------------------------------------------
    def _merge(self, new: KVCache, new_mask: torch.Tensor, lens: list[int]) -> None:
        """Copy each prefilled request's real positions (the last lens[j] of row j of `new`) to a free row."""
        self._ensure(max(lens) + 1)
        for j, n in enumerate(lens):
            keys, values = [], []
            for i in range(len(new.k)):
                k, v = new.layer(i)  # (k, G, S, D), left-padded: row j's real positions are at the end
                S = min(n, k.shape[2])  # a chunked layer holds the last C - 1 positions at most
                keys.append(k[j, :, k.shape[2] - S:])
                values.append(v[j, :, v.shape[2] - S:])
            row = self.free.pop(0)
            self.slot_cache.load(row, keys, values, n)
            self.slots.append(row)
        self.lengths += lens

    def _drop(self, keep: list[int]) -> None:
        """Keep running rows `keep`; the others' slot rows become free (nothing is copied)."""
        kept = set(keep)
        self.free = sorted(self.free + [s for r, s in enumerate(self.slots) if r not in kept])
        self.running = [self.running[r] for r in keep]
        self.next_ids = [self.next_ids[r] for r in keep]
        self.lengths = [self.lengths[r] for r in keep]
        self.slots = [self.slots[r] for r in keep]

    def fail_all(self, message: str) -> None:
        super().fail_all(message)
        self.slots, self.free = [], list(range(self.max_batch))

    def _ensure(self, positions: int) -> None:
        """Make the global layers hold `positions` positions per row (doubling; graphs are captured again)."""
        if positions > self.slot_cache.capacity:
            self.slot_cache.grow(self._capacity_for(positions))
            self.graphs.clear()

    # ---- the decode step -----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        self._ensure(max(self.lengths) + 1)
        top = max(self.slots) + 1
        fixed = self.cuda_graphs or self.compiled  # a graph per size: keep to the capture sizes
        b = next(s for s in self.sizes if s >= top) if fixed else top
        ids, pos = [0] * b, [0] * b
        for s, t, n in zip(self.slots, self.next_ids, self.lengths, strict=True):
            ids[s], pos[s] = t, n  # row s feeds its last token at its real position
        ids_t = torch.tensor(ids, device=self.device)
        pos_t = torch.tensor(pos, device=self.device)
        logits = self._replay(ids_t, pos_t) if self.cuda_graphs else self._call(ids_t, pos_t)  # (b, V)
        self.lengths = [n + 1 for n in self.lengths]
        self._sample(logits[torch.tensor(self.slots, device=self.device)], list(range(len(self.running))))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step of rows 0 .. b - 1: ids, pos long (b,) -> next-token logits (b, V). No host reads."""
        lm, cache = self.lm, self.slot_cache
        x = lm.model.embed_tokens(ids[:, None])  # (b, 1, D)
        masks = cache.begin(pos)
        phases = rope_phases(pos[:, None], self.inv_freq)  # (b, 1, D/2)
        for layer in lm.model.layers:
            x, _ = layer(x, phases, pos[:, None], masks[layer.chunked], cache)
        return lm.lm_head(lm.model.norm(x))[:, -1]  # (b, V)

    def _call(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The step, compiled if asked; a step torch.compile cannot take whole (e.g. quantized experts, which loop
        over experts by their counts) runs eagerly from then on, with a warning, rather than failing requests."""
        if self._compiled is None:
            return self.forward(ids, pos)
        try:
            return self._compiled(ids, pos)
        except Exception as e:  # dynamo's and symbolic shapes' errors share no base; a real error recurs eagerly
            warnings.warn(f"the decode step could not be compiled ({str(e).splitlines()[0]}); running it eagerly",
                          stacklevel=2)
            self._compiled = None
            return self.forward(ids, pos)

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        self._in_ids[:b].copy_(ids)
        self._in_pos[:b].copy_(pos)
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(b)
            except RuntimeError as e:  # the step reads back to the host somewhere: run it eagerly from now on
                warnings.warn(f"the decode step could not be captured as a CUDA graph ({e}); running it eagerly",
                              stacklevel=2)
                self.cuda_graphs, self.graphs = False, {}
                return self._call(ids, pos)
        graph, out = self.graphs[b]
        graph.replay()
        return out

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step for b rows. The warm-up runs compute this very step (same ids and positions), and the
        replay that follows writes the same keys to the same slots again, so nothing is computed twice wrongly."""
        ids, pos = self._in_ids[:b], self._in_pos[:b]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # kernels load and workspaces are allocated outside the capture
            for _ in range(2):
                self._call(ids, pos)  # compiles first, if asked (and falls back before the capture if it cannot)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = (self._compiled or self.forward)(ids, pos)
        self._pool = graph.pool()
        return graph, out
