"""Weight-only quantization for inference: int8, int4 and fp8 weights, dequantized on the fly in forward.

`quantize(model, bits)` swaps, in place and from outside the model (gpt-fast's module-swap pattern; the model code
knows nothing of it):
- every plain `nn.Linear` of the text decoder - attention q/k/v/o_proj, dense MLPs, the MoE shared expert - for a
  `QuantLinear`;
- every routed `Experts` block for a `QuantExperts`, whose `expert(e, x)` is the same SwiGLU on dequantized weights,
  so `MoE.route` runs unchanged.
Kept in float: the router (its logits choose the experts: a rounding error can flip a top-1 choice; it is an
`nn.Linear` subclass and the swap matches the exact type, so it is never converted even if `skip` is emptied), the
lm_head (precision-sensitive logits over the vocabulary), the embeddings (a lookup, not a GEMM) and the vision tower
and projector (small next to the decoder). The same list as herd.train.fp8, for the same reasons.

Formats (symmetric, no zero point; the absmax rule of LLM.int8, Dettmers et al. 2022, arXiv:2208.07339):
- int8: one scale per output channel, s = max|w_row| / 127, codes round(w / s) in [-127, 127] (-128 unused so the
  grid is symmetric). At 8 bits the per-row error is already below 0.4% of the row's max; groups buy little.
- int4: one scale per (output channel, group of `group_size` consecutive input features), s = max|w_group| / 7,
  codes in [-7, 7]. -8 is never produced: one of 16 levels is given up for a grid symmetric around an exact zero
  (llama.cpp's Q4_0 maps the signed max to -8 instead, to use all 16). Codes are stored as code + 8 (1..15), two per
  uint8 byte: the even input column in the low nibble, the odd one in the high nibble, so memory really halves.
  Groups along the input dimension follow GPTQ / AWQ practice (128 by default; 32 or 64 for small models).
- fp8: float8_e4m3fn values with one scale per output channel, s = max|w_row| / 448 (e4m3's largest finite value),
  3 mantissa bits so the error is relative (at most |w| / 16; a fixed 2^-10 s below e4m3's smallest normal) rather
  than a fixed step. Storage and dequantization work on CPU too.
- fp8 with `activations="fp8"` (W8A8, what vLLM and torchao call fp8 dynamic per-token / per-row): the same
  weights, and each call also quantizes its input rows to e4m3 (one scale per row, s = max|x_row| / 448) and
  multiplies the fp8 operands with `torch._scaled_mm`, which applies both scales to the float32 accumulator. On
  Hopper-class GPUs (compute capability 8.9+) this runs on the fp8 tensor cores: half the bytes of bf16 per weight
  read, twice the matmul rate. The price is the activation rounding (relative, at most 1/16 per element) on top of
  the weights'; per-row scales keep one outlier token from crushing the others' resolution. `_scaled_mm` needs
  input and output widths that are multiples of 16, checked for every layer before anything is converted. CPU
  builds of torch run the same call (slowly), which is what the tests exercise.
Scales are float32: exact whatever the model dtype, at a cost of 4 bytes per group (int4 at group 128 is 4.25 bits
per weight, at group 32 it is 5 bits).

Rounding is to nearest, so every dequantized weight is within half a step (s / 2) of the original; tests check this
per element, and that re-quantizing a dequantized weight gives back the same codes.

A layer whose input width is not a multiple of the int4 group size is refused (ValueError naming the layers and the
group sizes that would fit), before anything is converted: no silent per-channel fallback, whose error would be
several times larger. `group_size=None` asks for per-channel int4 explicitly.

Forward (`quant_linear`): the weight is dequantized to float32 and cast to the activation dtype, TILE weights (whole
output rows, 2 MiB of float32) at a time, each tile multiplied as soon as it is made. A full float copy of a layer
never exists, so the transient memory is one tile, not one layer (a Scout expert's gate_up would be 335 MB), and the
tile is still in cache when the matmul reads it. Tiling matters on CPU: a fresh 16 MB buffer per call costs
thousands of page faults, which cost more than dequantizing and multiplying in tiles. On a GPU the tiles are
GPU_TILE weights (128 MiB of float32), since there every tile is several kernel launches.

What it buys, honestly: resident weight memory of the converted layers drops about 4x (int8, fp8) and 6-7.5x (int4)
from float32 (half those factors from bfloat16).
The weight-only formats do not buy speed: every call decodes the codes and writes float tiles before a plain matmul,
more work than the float model's matmul alone. The bandwidth win of weight-only quantization needs a fused
dequantize-and-multiply kernel (tinygemm, Marlin, torch's `_weight_int8pack_mm`), not used here. fp8 dynamic does
multiply in fp8 and is faster than bfloat16 on an H200 at prefill sizes (see the README), but slower at decode
sizes, where quantizing the input rows (five small kernels) costs more than the matmul saves.
benchmarks/bench_quant.py and benchmarks/bench_fp8_matmul.py measure it next to perplexity.

NOTE footgun: quantize after the model has its final dtype and device. `model.to(device)` afterwards is fine, but
`model.to(dtype)` casts every floating buffer - the fp8 weights and all the float32 scales - to that dtype.
State dicts of quantized models hold `qweight` / `scale` buffers and are not a Hugging Face checkpoint: quantize
after loading (herd.from_pretrained), not before saving.

Shapes: O output features, I input features, G groups per row (I / group_size; 1 per channel), E experts,
D hidden, F expert width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.moe import Experts

QMAX = {8: 127, 4: 7, "fp8": torch.finfo(torch.float8_e4m3fn).max}  # largest code magnitude of each format
TINY = 1e-12  # the smallest row max an fp8 activation scale is made from (an all-zero row)
ACTIVATIONS = ("float", "fp8")  # what the inputs of a converted layer are multiplied in
SKIP = ("router", "lm_head", "embed", "vision", "projector")


# ---- the formats: plain functions on (..., O, I) weights ------------------------------------------------------------
def check_format(bits, group_size: int | None) -> int | None:
    """The effective group size (None: per output channel), or ValueError for a format herd does not have."""
    if isinstance(bits, bool) or not (isinstance(bits, int) or bits == "fp8") or bits not in QMAX:
        raise ValueError(f"bits must be 8, 4 or 'fp8', got {bits!r}")
    if bits != 4:
        return None  # int8 and fp8 are per output channel; group_size is the int4 knob
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 2 or group_size % 2):
        raise ValueError(f"int4 group_size must be a positive even int (two codes share a byte) or None for per "
                         f"output channel, got {group_size!r}")
    return group_size


def check_activations(bits, activations: str) -> bool:
    """True when the inputs are quantized to fp8 too (W8A8), or ValueError for an unknown or unsupported choice."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "fp8" and bits != "fp8":
        raise ValueError(f"activations='fp8' needs fp8 weights (bits='fp8'), got bits={bits!r}")
    return activations == "fp8"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes (..., I) in [-8, 7] -> uint8 (..., I/2): column 2j in the low nibble, 2j+1 in the high one."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., I/2) -> int8 codes (..., I)."""
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2).view(torch.int8).sub_(8)


def quantize_weight(w: torch.Tensor, bits, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w (..., O, I) along I; returns (codes, scale (..., O, G) float32). Codes: int8 (..., O, I) for 8 bits,
    packed uint8 (..., O, I/2) for 4, float8_e4m3fn (..., O, I) for fp8."""
    group_size = check_format(bits, group_size)
    n_in = w.shape[-1]  # I
    g = group_size or n_in
    if n_in % g or (bits == 4 and n_in % 2):
        raise ValueError(f"input width {n_in} is not a multiple of the group size {g}" if n_in % g
                         else f"int4 needs an even input width to pack two codes per byte, got {n_in}")
    wg = w.detach().float().unflatten(-1, (n_in // g, g))  # (..., O, G, g)
    amax = wg.abs().amax(-1)  # (..., O, G)
    scale = torch.where(amax > 0, amax / QMAX[bits], torch.ones_like(amax))  # an all-zero group keeps codes 0
    x = wg / scale[..., None]
    if bits == "fp8":  # |x| <= 448 up to float rounding; clamp anyway, the cast turns overflow into NaN
        return x.clamp(-QMAX[bits], QMAX[bits]).flatten(-2).to(torch.float8_e4m3fn), scale
    q = x.round().clamp(-QMAX[bits], QMAX[bits]).flatten(-2).to(torch.int8)  # (..., O, I) round half to even
    return (pack_int4(q) if bits == 4 else q), scale


def fp8_as_fp16(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes -> float16 holding exactly value * 2^-8, by moving bits instead of torch's cast (which
    runs scalar on CPU). e4m3 is s|eeee|mmm with bias 7; placed as s|0eeee|mmm0000000 in
    float16 (bias 15) it reads as 2^(e - 15) (1 + m/8) = value * 2^-8, and a subnormal e4m3 (e = 0) lands on the
    float16 subnormal with the same factor. The NaN codes (0x7f, 0xff) would read as finite: quantize_weight never
    makes them."""
    b = q.view(torch.uint8).to(torch.int16)
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).view(torch.float16)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, bits, dtype: torch.dtype) -> torch.Tensor:
    """(..., O, I) weight in `dtype` from quantize_weight's output: code * scale in float32, then one cast."""
    if bits == 4:
        q = unpack_int4(codes)
    elif bits == "fp8":  # the 2^-8 of fp8_as_fp16 goes back into the scale: a power of two, exact
        q, scale = fp8_as_fp16(codes), scale * 256
    else:
        q = codes
    # int8 / float16 x float32 promotes: float32(code) * scale in one pass and one float32 buffer
    w = q.unflatten(-1, (scale.shape[-1], -1)) * scale[..., None]  # (..., O, G, g)
    return w.flatten(-2).to(dtype)


TILE = 2**19  # weights dequantized at once by quant_linear: 2 MiB of float32 (module docstring)
# On a GPU each tile costs a handful of kernel launches and the transient buffer is no burden: 128 MiB of float32
# (a 8192 x 8192 layer in two tiles; 2 MiB tiles would make it 128, see the README's quantization benchmarks)
GPU_TILE = 2**25


def quant_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) for codes (O, ...), dequantizing whole output rows, TILE weights at a
    time; a layer of at most TILE weights is one plain F.linear on its dequantized weight."""
    n_out, n_in = scale.shape[0], codes.shape[-1] * (2 if bits == 4 else 1)
    rows = max(1, (GPU_TILE if x.is_cuda else TILE) // n_in)
    bias = None if bias is None else bias.to(x.dtype)
    if n_out <= rows:
        return F.linear(x, dequantize_weight(codes, scale, bits, x.dtype), bias)
    outs = []
    for a in range(0, n_out, rows):
        w = dequantize_weight(codes[a:a + rows], scale[a:a + rows], bits, x.dtype)  # (rows, I)
        outs.append(F.linear(x, w, None if bias is None else bias[a:a + rows]))
    return torch.cat(outs, dim=-1)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, I) -> (e4m3 codes (M, I), float32 scale (M, 1)): the absmax rule per row, computed on every call
    (dynamic: no calibration set, and a row's scale depends on that token alone, so batching never changes it).

    Written as few passes as possible, since on a GPU each is a kernel launch and at decode sizes the launches, not
    the bytes, are the cost (benchmarks/bench_fp8_matmul.py): the inf-norm takes |x|, the row max and the float32
    cast in one reduction; an all-zero row gets a tiny scale instead of a branch (its codes are 0 either way); and
    no clamp to +-448, because x / (amax / 448) exceeds 448 by float rounding only, which the cast rounds back."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)  # (M, 1)
    scale = amax.clamp(min=TINY) / QMAX["fp8"]
    return (x / scale).to(torch.float8_e4m3fn), scale


@functools.cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes per-row scales (2.13 does; 2.11 accepts per-tensor ones only)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)  # 16 x 16: scales of 16 values each, not one per tensor
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantized fp8 weight, bias) with x rounded to e4m3 per row too: one `torch._scaled_mm` of the
    fp8 operands, y = (xq @ codes.T) * sx * sw, scales applied to the float32 accumulator. codes (O, I) is row-major,
    so codes.T is the column-major right operand the kernel wants, without a copy."""
    shape = x.shape
    xq, sx = quantize_rows_fp8(x.reshape(-1, shape[-1]))  # (M, I), (M, 1)
    if x.is_cuda:  # CUDA's row-wise scaled kernels write bfloat16 only
        y = torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=scale.t(), out_dtype=torch.bfloat16).to(x.dtype)
    elif _cpu_rowwise_scaled_mm():
        y = torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=scale.t(), out_dtype=x.dtype)  # (M, O)
    else:  # the same products of the same fp8 values, accumulated in float32
        y = ((xq.float() @ codes.float().t()) * sx * scale.t()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*shape[:-1], -1)


def _matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits, fp8_act: bool,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for quantized W: in fp8 (fp8_linear) or on the dequantized weight (quant_linear)."""
    if fp8_act:
        return fp8_linear(x, codes, scale, bias)
    return quant_linear(x, codes, scale, bits, bias)


def _describe(bits, group_size: int | None, fp8_act: bool = False) -> str:
    return f"bits={bits}" + (f", group_size={group_size}" if bits == 4 else "") + \
        (", activations=fp8" if fp8_act else "")


# ---- the modules ----------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight: y = x @ dequantize(W).T + b, dequantized to x's dtype on every call."""

    def __init__(self, linear: nn.Linear, bits, group_size: int | None = None, activations: str = "float"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, check_format(bits, group_size)
        self.fp8_act = check_activations(bits, activations)
        codes, scale = quantize_weight(linear.weight, bits, self.group_size)
        self.register_buffer("qweight", codes)  # (O, I) int8 / fp8, (O, I/2) uint8 for int4
        self.register_buffer("scale", scale)  # (O, G) float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, self.bits, dtype)  # (O, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.qweight, self.scale, self.bits, self.fp8_act, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"{_describe(self.bits, self.group_size, self.fp8_act)}"


class QuantExperts(nn.Module):
    """`Experts` with quantized weights. Stored transposed to (E, out, in) so the groups run along each expert's
    input dimension like a linear's; `expert(e, x)` dequantizes expert e alone (never all E at once) and computes
    the same SwiGLU as `Experts.expert` on those weights."""

    def __init__(self, experts: Experts, bits, group_size: int | None = None, activations: str = "float"):
        super().__init__()
        self.bits, self.group_size = bits, check_format(bits, group_size)
        self.fp8_act = check_activations(bits, activations)
        self.n_experts, self.width, self.hidden = experts.down_proj.shape  # E, F, D
        gu, gu_s = self._quantize(experts.gate_up_proj.mT)  # (E, 2F, D) codes
        dn, dn_s = self._quantize(experts.down_proj.mT)  # (E, D, F) codes
        self.register_buffer("gate_up_q", gu)
        self.register_buffer("gate_up_scale", gu_s)  # (E, 2F, D / g)
        self.register_buffer("down_q", dn)
        self.register_buffer("down_scale", dn_s)  # (E, D, F / g)

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_weight one expert at a time: the float32 working copies are one expert's, not all E's."""
        parts = [quantize_weight(w[e], self.bits, self.group_size) for e in range(w.shape[0])]
        return torch.stack([c for c, _ in parts]), torch.stack([s for _, s in parts])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert e on its tokens x (n, D), like Experts.expert."""
        gate_up = _matmul(x, self.gate_up_q[e], self.gate_up_scale[e], self.bits, self.fp8_act)  # (n, 2F)
        gate, up = gate_up.chunk(2, dim=-1)  # (n, F) each; gate is the first F columns, as in the checkpoint
        return _matmul(up * F.silu(gate), self.down_q[e], self.down_scale[e], self.bits, self.fp8_act)  # (n, D)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj (E, D, 2F), down_proj (E, F, D)) in the float `Experts` (checkpoint) layout."""
        return (dequantize_weight(self.gate_up_q, self.gate_up_scale, self.bits, dtype).mT.contiguous(),
                dequantize_weight(self.down_q, self.down_scale, self.bits, dtype).mT.contiguous())

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, hidden={self.hidden}, width={self.width}, " \
               f"{_describe(self.bits, self.group_size, self.fp8_act)}"


# ---- swapping modules -----------------------------------------------------------------------------------------------
def model_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of `model`; tied tensors (lm_head = embeddings) are counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclass
class QuantSummary:
    """What `quantize` converted, and the memory before and after (whole model, and the converted modules alone)."""

    bits: int | str
    group_size: int | None
    activations: str = "float"
    converted: list[str] = field(default_factory=list)  # qualified module names, model order
    bytes_before: int = 0
    bytes_after: int = 0
    converted_bytes_before: int = 0
    converted_bytes_after: int = 0

    @property
    def ratio(self) -> float:
        """Memory of the converted modules before / after (about 4 for int8 and fp8, 6-7.5 for int4)."""
        return self.converted_bytes_before / max(self.converted_bytes_after, 1)


def _targets(model: nn.Module, include_experts: bool, skip: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if any(s in name for s in skip):
            continue
        # exact types: subclasses (Router) have their own forward that a swap would discard
        if type(m) is nn.Linear or (include_experts and type(m) is Experts):
            out.append((name, m))
    return out


def _widths(m: nn.Module) -> list[tuple[int, int]]:
    """(input, output) width of each weight of a module, as the matmul sees it (groups run along the input)."""
    if isinstance(m, Experts):
        _, D, F2 = m.gate_up_proj.shape
        return [(D, F2), (F2 // 2, D)]
    return [(m.in_features, m.out_features)]


def _more(bad: list) -> str:
    return f" and {len(bad) - 4} more" if len(bad) > 4 else ""


def _check_groups(targets: list[tuple[str, nn.Module]], bits, group_size: int | None) -> None:
    g = group_size or 2  # per-channel int4 still packs two codes per byte
    bad = [(name, w) for name, m in targets for w, _ in _widths(m) if w % g]
    if bits != 4 or not bad:
        return
    widths = sorted({w for _, m in targets for w, _ in _widths(m)})
    fits = [c for c in (16, 32, 64, 128, 256) if all(w % c == 0 for w in widths)]
    where = ", ".join(f"{name} (input width {w})" for name, w in bad[:4]) + _more(bad)
    hint = f"group sizes that fit every layer: {fits}" if fits else "no power-of-two group size fits every layer"
    raise ValueError(f"int4 group_size={group_size} does not divide the input width of {len(bad)} weight(s): {where}. "
                     f"{hint}; group_size=None quantizes per output channel. Nothing was converted.")


def _check_fp8_shapes(targets: list[tuple[str, nn.Module]]) -> None:
    """torch._scaled_mm multiplies only widths that are multiples of 16 (its kernels' tile alignment)."""
    bad = [(name, i, o) for name, m in targets for i, o in _widths(m) if i % 16 or o % 16]
    if bad:
        where = ", ".join(f"{n} ({i} -> {o})" for n, i, o in bad[:4]) + _more(bad)
        raise ValueError(f"activations='fp8' needs input and output widths that are multiples of 16 "
                         f"(torch._scaled_mm); {len(bad)} weight(s) are not: {where}. Skip them (skip=...) or use "
                         f"fp8 weights alone (activations='float'). Nothing was converted.")


@torch.no_grad()
def quantize(model: nn.Module, bits: int | str = 8, group_size: int | None = 128, include_experts: bool = True,
             skip: tuple[str, ...] = SKIP, activations: str = "float") -> QuantSummary:
    """Quantize the linear layers (and routed experts) of `model` in place; returns what was converted.

    A module is skipped when any string of `skip` occurs in its qualified name ("router" matches
    `...feed_forward.router`, "embed" matches `embed_tokens`). `activations="fp8"` (with bits="fp8") quantizes
    each layer's input rows on the fly as well and multiplies in fp8 (module docstring). Validation happens before
    any swap, so a refused format leaves the model untouched.
    """
    group_size = check_format(bits, group_size)
    fp8_act = check_activations(bits, activations)
    targets = _targets(model, include_experts, tuple(skip))
    if any(p.is_meta for _, m in targets for p in m.parameters()):
        raise ValueError("the model is on the meta device (no weights): load or materialize it before quantizing")
    _check_groups(targets, bits, group_size)
    if fp8_act:
        _check_fp8_shapes(targets)
    summary = QuantSummary(bits=bits, group_size=group_size, activations=activations,
                           bytes_before=model_bytes(model))
    for name, m in targets:
        kind = QuantExperts if isinstance(m, Experts) else QuantLinear
        q = kind(m, bits, group_size, activations)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        summary.converted.append(name)
        summary.converted_bytes_before += model_bytes(m)
        summary.converted_bytes_after += model_bytes(q)
    summary.bytes_after = model_bytes(model)
    return summary


# the named schemes of the command line (`herd generate / chat / serve --quantize NAME`)
SCHEMES = {"int8": {"bits": 8}, "int4": {"bits": 4}, "fp8": {"bits": "fp8"},
           "fp8-dynamic": {"bits": "fp8", "activations": "fp8"}}


def quantize_scheme(model: nn.Module, scheme: str, group_size: int | None = 128) -> QuantSummary:
    """quantize(model, ...) by name: int8, int4 (groups of `group_size`), fp8 (weights), fp8-dynamic (W8A8)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return quantize(model, group_size=group_size, **SCHEMES[scheme])


def describe(summary: QuantSummary) -> str:
    """One line for logs: what was converted and the memory it saved."""
    fmt = {8: "int8", 4: f"int4 (groups of {summary.group_size})" if summary.group_size else "int4"}.get(
        summary.bits, "fp8" + (" weights and activations" if summary.activations == "fp8" else ""))
    return (f"quantized {len(summary.converted)} modules to {fmt}: converted weights {summary.ratio:.2f}x smaller, "
            f"model {summary.bytes_before / 2**20:.1f} -> {summary.bytes_after / 2**20:.1f} MiB")
