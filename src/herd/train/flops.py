"""Training FLOPs per token and the peak they are measured against (MFU).

- FLOPs per token (training, forward + backward) = 6 x active parameters, leaving out the input embedding (a lookup,
  not a matmul), + 12 x heads x head_dim x context per layer for the attention scores and values (PaLM, arXiv:
  2204.02311, appendix B), with context = seq_len for global (NoPE) layers and min(seq_len, chunk) for chunked ones.
  A multimodal model's vision tower is not counted (it is small next to the decoder and runs on few rows).
- Peak: on CPU, the best of a few square float32 / bfloat16 matmuls measured on first use (CPUs differ too much for
  a table, and without AVX512-BF16 bfloat16 runs at a fraction of the float32 rate: the README's training benchmark
  gives the development VM's figures); on GPUs the published dense peak (MFU's usual definition); `peak_flops`
  overrides both.
"""

from __future__ import annotations

import functools
import time

import torch

GPU_PEAK = {"H100": (67e12, 989e12), "H200": (67e12, 989e12), "A100": (19.5e12, 312e12)}  # (fp32, bf16) dense


def flops_per_token(mcfg, seq_len: int) -> float:
    """Training FLOPs per token of a TextConfig (or a multimodal config's decoder), as the module docstring says."""
    from herd.sizes import count_params

    mcfg = mcfg.text_config
    n = count_params(mcfg).active - (0 if mcfg.tie_word_embeddings else mcfg.vocab_size * mcfg.hidden_size)
    attn = sum(12 * mcfg.num_attention_heads * mcfg.head_dim *
               (min(seq_len, mcfg.attention_chunk_size) if mcfg.uses_rope(i) else seq_len)
               for i in range(mcfg.num_hidden_layers))
    return 6.0 * n + attn


@functools.cache
def cpu_matmul_peak(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` (n x n) @ (n x n) products on this CPU, after one warm-up."""
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def default_peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type == "cpu":
        return cpu_matmul_peak(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (fp32, bf16) in GPU_PEAK.items():
            if key in name:
                return bf16 if dtype == "bfloat16" else fp32
    return None
