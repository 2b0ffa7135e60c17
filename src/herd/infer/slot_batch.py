"""The fixed-shape batch layout: every request owns a row of a herd.model.slot_cache.SlotCache.

herd.infer.padded_batch.PaddedBatch keeps one left-padded batch cache: rows join by padding and concatenating the
whole cache, leave by copying the rest, and every step's shapes differ. That is the right trade on a CPU run
eagerly, where a step costs its matrix multiplies. A small model's decode step on a GPU is bound by launching
kernels, not by arithmetic, and the cure is to capture the step once as a CUDA graph and replay it (what vLLM and
gpt-fast do); torch.compile likewise wants shapes that do not change. A graph replays fixed shapes at fixed
addresses, hence this layout (the engine, herd.infer.engine.Engine, is the same for both):
- prefill is the engine's (eager, left-padded groups into a KVCache of their own); each request's keys are then
  copied to its row at their real positions (no left padding: a row computes what it computes alone);
- a decode step is one model call over rows 0 .. b - 1 of the slot cache, b the smallest capture size (1, 2, 4, ...
  max_batch) that covers every live row; free rows in that range compute garbage nobody reads. A finished request
  just frees its row (nothing is copied), and a new one takes the lowest free row, which keeps b small;
- the global layers' capacity doubles when a row is about to run out (the graphs are then captured again);
- with `cuda_graphs` (default: on when the model is on a CUDA device) each b is captured once, on first use, and
  replayed with the step's ids and positions copied into its input buffers. A model whose step cannot be captured
  (one that reads a value back to the host, e.g. MoE experts on a GPU without a grouped matmul) falls back to the
  eager step with a warning. Without graphs the same step runs eagerly (CPU: tests and the benchmark's A/B);
- with `compile` the step goes through torch.compile first (one graph per batch size and capacity, compiled on first
  use or all at once by `warmup()`, which takes tens of seconds a size on a small CPU); on a GPU it fuses the step's
  small kernels before the capture. A step it cannot take whole (quantized experts loop over experts by their
  counts) runs eagerly, with a warning.

Use: `Engine(model, tokenizer, layout=SlotBatch(model, max_batch=32, compile=True))`, then `engine.warmup()` to
compile every batch size before the first request. The benchmark figures are in the README (bench_engine.py).
Shapes: b rows in a step, V vocab, D hidden.
"""

from __future__ import annotations

import logging
import warnings

import torch

from herd.model.cache import KVCache
from herd.model.slot_cache import SlotCache


def _no_cshim_notes(record: logging.LogRecord) -> bool:
    """Inductor's C++ wrapper notes every view op it calls through its generic path (a few per layer, per compile):
    noise in a server's log, so that one message is dropped."""
    return "missing a c-shim implementation" not in record.getMessage()


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SlotBatch:
    def __init__(self, model, max_batch: int = 32, capacity: int = 256, cuda_graphs: bool | None = None,
                 compile: bool = False):
        self.model, self.max_batch = model, max_batch
        self.decoder, self.cfg = model.decoder, model.text_config  # decode steps never see images
        self.device = next(model.parameters()).device
        self.cache = SlotCache(self.cfg, max_batch, self._capacity_for(capacity), self.device, self.decoder.dtype)
        self.slots: list[int] = []  # cache row of the engine's running[r]
        self.free = list(range(max_batch))  # free rows, ascending
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
        where it would stall every running request. `progress(i, n, b)` is called before each size. Only with no
        rows in use (Engine.warmup checks): the dummy steps write position 0 of the rows they run."""
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
    def admit(self, new: KVCache, new_mask: torch.Tensor, lens: list[int]) -> None:
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
            self.cache.load(row, keys, values, n)
            self.slots.append(row)

    def keep(self, rows: list[int]) -> None:
        """Keep the engine's running rows `rows`; the others' cache rows become free (nothing is copied)."""
        kept = set(rows)
        self.free = sorted(self.free + [s for r, s in enumerate(self.slots) if r not in kept])
        self.slots = [self.slots[r] for r in rows]

    def reset(self) -> None:
        self.slots, self.free = [], list(range(self.max_batch))

    def _ensure(self, positions: int) -> None:
        """Make the global layers hold `positions` positions per row (doubling; graphs are captured again)."""
        if positions > self.cache.capacity:
            self.cache.grow(self._capacity_for(positions))
            self.graphs.clear()

    # ---- the decode step -----------------------------------------------------------------------------------------
    def decode(self, ids: list[int], lengths: list[int]) -> torch.Tensor:
        """One step: the request in row slots[r] feeds ids[r] at position lengths[r]; returns logits (R, V)."""
        self._ensure(max(lengths) + 1)
        top = max(self.slots) + 1
        fixed = self.cuda_graphs or self.compiled  # a graph per size: keep to the capture sizes
        b = next(s for s in self.sizes if s >= top) if fixed else top
        step_ids, step_pos = [0] * b, [0] * b
        for s, t, n in zip(self.slots, ids, lengths, strict=True):
            step_ids[s], step_pos[s] = t, n  # row s feeds its last token at its real position
        ids_t = torch.tensor(step_ids, device=self.device)
        pos_t = torch.tensor(step_pos, device=self.device)
        logits = self._replay(ids_t, pos_t) if self.cuda_graphs else self._call(ids_t, pos_t)  # (b, V)
        return logits[torch.tensor(self.slots, device=self.device)]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step of rows 0 .. b - 1 as one model call: ids, pos long (b,) -> next-token logits (b, V).
        Nothing is read back to the host: the ids are embedded here because the model's own range check on
        input_ids reads them (the sampler's ids are in range by construction)."""
        x = self.decoder.model.embed_tokens(ids[:, None])  # (b, 1, D)
        return self.decoder(inputs_embeds=x, position_ids=pos[:, None], cache=self.cache, logits_to_keep=1)[:, -1]

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
