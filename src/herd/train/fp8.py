"""FP8 training of the large linear layers through torchao's float8 (`convert_to_float8_training`).

Meta pre-trained Llama 4 Behemoth in FP8 (390 TFLOPs/GPU on 32K GPUs; "The Llama 4 herd" blog post). torchao swaps an
nn.Linear for a Float8Linear that keeps its weight in high precision (the optimizer's master copy) and, in every
matmul of forward and backward, casts inputs and weights to float8 e4m3 and output gradients to e5m2 with dynamic
per-tensor scales ("tensorwise", torchao's default recipe), accumulating in high precision.

What is converted, and why the rest is not (the same lesson as pytorch/torchtitan's float8 docs and
karpathy/nanochat's fp8.py and dev/LOG.md):
- converted: the attention projections (q/k/v/o_proj), dense MLPs and the MoE shared expert (gate/up/down_proj) of
  the text decoder - the big GEMMs, where FP8 pays;
- kept: the router (a tiny GEMM whose logits choose experts: an FP8 rounding can flip a top-1 choice; it is also an
  nn.Linear subclass with its own forward that a swap would discard), the lm_head (the logits feed the softmax over a
  large vocabulary and are precision-sensitive; torchtitan filters `output` too), embeddings (a lookup, no GEMM),
  the vision tower and projector (small, trained apart in Meta's recipe);
- kept: any linear with a dimension not a multiple of 16 (`torch._scaled_mm` requires it), and, with `min_dim`,
  linears smaller than that (on GPUs FP8 only wins for large K and N, torchtitan's `auto_filter_small_kn`);
- kept: the routed experts. They are 3-D parameters (E, D, 2F) used by herd's own grouped loop, not nn.Linear, and
  grouped float8 (torchao's `_scaled_grouped_mm`) is a GPU-only prototype; they run in the model's dtype.

Order of operations: build or load the model, `apply_fp8`, then shard (herd.train.distributed.shard), then build the
optimizer. Speed needs torch.compile on an FP8-capable GPU (H100 and later); on CPU the casts are emulated, so here
FP8 is about numerics (tests/train/test_fp8.py measures the loss against the unconverted run).
"""

from __future__ import annotations

from torch import nn

# the text decoder's GEMM layers worth converting (Hugging Face checkpoint names)
LARGE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_filter(min_dim: int = 0):
    """The module filter for `convert_to_float8_training`: True for linears that should run in float8."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if type(module) is not nn.Linear:  # exact type: Router subclasses nn.Linear and must stay as it is
            return False
        if "vision" in fqn or "projector" in fqn or fqn.rsplit(".", 1)[-1] not in LARGE_LINEARS:
            return False
        k, n = module.in_features, module.out_features
        return k % 16 == 0 and n % 16 == 0 and min(k, n) >= min_dim

    return keep


def apply_fp8(model: nn.Module, min_dim: int = 0, config=None) -> nn.Module:
    """Swap the large decoder linears for torchao Float8Linear in place (see the module docstring); returns model.

    `config` is a torchao `Float8LinearConfig` (default: tensorwise dynamic scaling); `min_dim` skips linears whose
    smaller dimension is below it.
    """
    from torchao.float8 import convert_to_float8_training  # optional dependency: herd[train]

    return convert_to_float8_training(model, module_filter_fn=fp8_filter(min_dim), config=config)


def fp8_modules(model: nn.Module) -> list[str]:
    """Names of the modules that run in float8."""
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]
