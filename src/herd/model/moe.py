"""Llama 4 feed-forward blocks: the dense SwiGLU MLP and the mixture-of-experts block.

MoE (Llama 4 model card; meta-llama/llama-models models/llama4/moe.py; transformers' `Llama4TextMoe`):
- a linear router scores every expert; top-k (top-1 for Scout and Maverick) is taken on the raw logits;
- the chosen expert's weight is sigmoid(logit), computed in float32 - a sigmoid, not a softmax, and never
  renormalised;
- the weight scales the expert's INPUT, not its output. SwiGLU is nonlinear, so the two are not equivalent; scaling
  the output is the classic Llama 4 porting bug (sglang #7889, llm-compressor #1907);
- a shared expert of the same width sees every token and is always added.

Unlike the reference, which runs every expert on every token (unselected ones on zero inputs), herd groups tokens by
expert and runs only the selected experts: E/k times fewer FLOPs in the routed part, identical results. Where torch
has a grouped matmul for the device and dtype (`torch._grouped_mm`: float32 on CPU, bfloat16 on Hopper GPUs), all
experts run in two calls over the sorted tokens with their group boundaries on the device: no per-expert loop of
small ops, and no host synchronization to learn the group sizes, which a GPU decode step would otherwise pay in
every MoE layer. Elsewhere (bfloat16 on CPU, where the grouped kernel is slower than the loop; older GPUs)
a loop over the busy experts computes the same thing.

Expert weights keep the checkpoint layout: gate_up_proj (E, D, 2F) with gate in the first F columns and the input
multiplied on the left (x @ W), down_proj (E, F, D).

Shapes: N tokens (B*T flattened), D hidden, E experts, k experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and as the MoE shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether torch's grouped matmul runs (and pays off) for x's device and dtype (module docstring)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    on_hopper = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return on_hopper and x.dtype == torch.bfloat16


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors (names and layout of the Hugging Face checkpoint)."""

    def __init__(self, n_experts: int, hidden: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, hidden, 2 * width))  # (E, D, 2F)
        self.down_proj = nn.Parameter(torch.empty(n_experts, width, hidden))  # (E, F, D)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert e on its tokens x (n, D)."""
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, F) each
        return (up * F.silu(gate)) @ self.down_proj[e]  # (n, D)

    def grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Every expert on its rows of x (M, D), sorted by expert: rows ends[e-1]:ends[e] (int32 (E,)) go to e."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # a compiled decode step: opaque
            return grouped_swiglu(x, self.gate_up_proj, self.down_proj, ends)
        return _grouped_swiglu(x, self.gate_up_proj, self.down_proj, ends)


def _grouped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    gate, up = torch._grouped_mm(x, gate_up, offs=ends).chunk(2, dim=-1)  # (M, F) each
    return torch._grouped_mm(up * F.silu(gate), down, offs=ends)  # (M, D)


# The same computation as one opaque operator, for torch.compile of inference steps (herd.infer.slot_batch):
# inductor cannot trace torch._grouped_mm in float32 (its shape function takes bfloat16 only), and an operator it
# only calls needs no tracing. It has no backward, so training (grad enabled) traces the plain function above.
grouped_swiglu = torch.library.custom_op("herd::grouped_swiglu", mutates_args=())(_grouped_swiglu)


@grouped_swiglu.register_fake
def _(x, gate_up, down, ends):
    return x.new_empty(x.shape[0], down.shape[-1])  # (M, D)


class Router(nn.Linear):
    """Linear scorer over experts; returns (expert ids, sigmoid weights, raw logits).

    `expert_bias` (E,) is the auxiliary-loss-free load-balancing bias (Wang et al. 2024, arXiv:2408.15664; used by
    DeepSeek-V3): it shifts which experts are CHOSEN, never the weights, and training nudges it toward balance. It is
    zero for released checkpoints and for a herd run that finished its bias cooldown (herd.train.balance). It is a
    non-persistent buffer: the state dict matches Llama 4's format, and the formats that carry it do so explicitly
    (herd.train.snapshots always; herd.formats.hf as extra tensors, when non-zero).
    """

    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__(hidden, n_experts, bias=False)
        self.top_k = top_k
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor):
        logits = super().forward(x)  # (N, E)
        # topk over (logits + 0) picks exactly what topk over logits picks; ties resolved as torch.topk does
        top_idx = torch.topk(logits + self.expert_bias.to(logits.dtype), self.top_k, dim=1).indices  # (N, k)
        top_logit = logits.gather(1, top_idx)
        weights = torch.sigmoid(top_logit.float()).to(x.dtype)  # (N, k) sigmoid in fp32, like the reference
        return top_idx, weights, logits


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, F_, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.n_experts, self.top_k = E, cfg.num_experts_per_tok
        self.experts = Experts(E, D, F_)
        self.router = Router(D, E, cfg.num_experts_per_tok)
        self.shared_expert = MLP(D, F_)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        top_idx, weights, logits = self.router(x)
        out = self.shared_expert(x)  # (N, D)
        routed = self.route(x, top_idx, weights)
        return (out + routed).view(shape), logits

    def route(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over chosen experts of expert_e(w * x): tokens sorted by expert, then every expert in one grouped
        matmul chain where torch has one (module docstring), else one matmul chain per busy expert."""
        N, k = top_idx.shape
        flat_e = top_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_e, stable=True)
        token = order // k  # token of each sorted assignment
        # a scatter, not bincount: bincount on CUDA reads the largest id back to the host, which would stop a decode
        # step from being captured as a CUDA graph (herd.infer.slot_batch)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_e, torch.ones_like(flat_e))  # (E,)
        scaled = x[token] * weights.reshape(-1)[order, None]  # (N*k, D) expert INPUT scaled by its weight
        # one row on CPU (batch-1 decode): one expert's plain matmuls beat a grouped call over all E groups, except
        # in a compiled step, which cannot follow the loop's data-dependent sizes. The grouped kernel does not cast
        # (autocast leaves it alone), so it also needs weights of the input's dtype.
        grouped = hasattr(self.experts, "grouped") and self.experts.gate_up_proj.dtype == scaled.dtype
        if grouped and grouped_mm_ok(scaled) and (N * k > 1 or x.is_cuda or torch.compiler.is_compiling()):
            y = self.experts.grouped(scaled, counts.cumsum(0).to(torch.int32))  # (N*k, D) in sorted order
        else:
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    outs.append(self.experts.expert(e, scaled[start:start + n]))
                start += n
            y = torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])
        if k == 1:  # each token has one output row: undo the sort instead of accumulating
            return y.new_empty(y.shape).index_copy_(0, token, y)
        return x.new_zeros(x.shape).index_add_(0, token, y)
