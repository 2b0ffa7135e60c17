"""A few AdamW steps of the tiny model with FSDP2 on a fixed global batch; run by torchrun from test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/fsdp_worker.py --out losses.json

Each rank takes its contiguous slice of the global batch; the logged loss is the mean over ranks. `train()` called in
a plain process (no torchrun) trains on the whole global batch: the single-process reference.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import herd
from herd.train.balance import expert_loads, routers, update_biases
from herd.train.distributed import all_reduce_mean, cleanup, init_distributed, is_main, shard

GLOBAL_BATCH, SEQ = 4, 32


def global_batch() -> torch.Tensor:
    return torch.randint(0, 512, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(123))


def train(steps: int, rank: int = 0, world: int = 1) -> dict:
    model = shard(herd.build_model(herd.preset("tiny"), seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    per = GLOBAL_BATCH // world
    data = global_batch()[rank * per:(rank + 1) * per]  # (B / world, T + 1)
    losses = []
    for _ in range(steps):
        logits, router_logits = model(data[:, :-1], return_router_logits=True)
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        # the aux-loss-free update all-reduces loads: every rank must end with the single-process biases
        update_biases(model, expert_loads(model, router_logits), rate=1e-2)
        losses.append(float(all_reduce_mean(loss)))
    return {"losses": losses, "expert_bias": [r.expert_bias.tolist() for r in routers(model)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    result = train(args.steps, rank, world)
    result["world_size"] = world
    # every rank writes its own view, so the test can check that all ranks agree
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(result, f)
    if is_main():
        with open(args.out, "w") as f:
            json.dump(result, f)
    cleanup()


if __name__ == "__main__":
    main()
