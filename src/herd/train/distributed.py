"""Data-parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`), launched by torchrun.

FSDP2 shards every parameter along dim 0 across ranks as a DTensor; before a module's forward it all-gathers that
module's parameters, frees them after, and reduce-scatters (averages) gradients in backward. Wrapping each decoder
layer separately (then the root, which takes the embeddings, final norm and lm_head) means one layer's parameters are
gathered at a time and communication overlaps compute: pytorch/torchtitan's `apply_fsdp`. The MoE experts'
(E, D, 2F) tensors shard over experts; the routers' `expert_bias` is a buffer, replicated, and stays identical on
every rank because herd.train.balance all-reduces the loads before updating it.

Backends: gloo on CPU, nccl on CUDA, picked from the device. Without torchrun's environment variables everything
runs as a single process (rank 0 of 1, no process group), so the same script trains on a laptop.

Order: build the model, optionally `apply_fp8` (herd.train.fp8), `shard`, then create the optimizer on the sharded
parameters. Gradients are averaged over ranks, so each rank's loss must be its local mean: with equal local batches
the step equals one process on the whole global batch (tests/train/test_distributed.py checks it to 1e-5).

Launching (torchrun is `python -m torch.distributed.run`):

    # one machine, 8 processes (GPUs, or CPU processes with gloo)
    torchrun --standalone --nproc_per_node 8 train.py ...

    # two machines with 8 GPUs each: run on both, same rendezvous endpoint (the first machine's address)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id myrun train.py ...

    # or with fixed ranks instead of rendezvous: --nnodes 2 --node_rank {0,1} --master_addr HOST0 --master_port 29500

Each process reads RANK, LOCAL_RANK and WORLD_SIZE from torchrun; on CUDA it uses GPU LOCAL_RANK. NCCL across nodes
needs the nodes to reach each other on the chosen interface (NCCL_SOCKET_IFNAME when there are several). Within one
node FSDP over all GPUs is the usual choice; across many nodes pass a 2-D mesh (replicate x shard,
`init_device_mesh(device, (nodes, gpus_per_node))`) for HSDP: shards inside a node, replicas across.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when launched by torchrun, else single-process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the group starts, so NCCL binds each rank to its own GPU
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return rank, world, device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder (and vision encoder) layer, then the root; returns the same model.

    `mesh` is a DeviceMesh (1-D: FSDP; 2-D (replicate, shard): HSDP); None uses all ranks. A no-op without a
    process group, so single-process runs need no special case.
    """
    if not _active():
        return model
    from torch.distributed.fsdp import fully_shard

    from herd.model.text import DecoderLayer
    from herd.model.vision import VisionEncoderLayer

    for m in model.modules():
        if isinstance(m, (DecoderLayer, VisionEncoderLayer)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the rank that logs and writes files."""
    return not _active() or dist.get_rank() == 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor; `t` itself is unchanged), e.g. for logging the global loss."""
    t = t.detach().clone()
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group at the end of a run, so torchrun's ranks exit cleanly. A rank that exits with its
    gloo group alive aborts now and then in the group's teardown (SIGABRT, "terminate called without an active
    exception"). A barrier first, so that no rank tears its connections down while a peer is still finishing the
    last collective."""
    if _active():
        dist.barrier()
        dist.destroy_process_group()
