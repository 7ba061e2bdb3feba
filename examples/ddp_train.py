"""Data-parallel training of a small sketched model with DistributedDataParallel.

Launch (one process per GPU, or 2 CPU processes on gloo without GPUs):

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 5 --device cpu
    python examples/ddp_train.py            # a single process, same code path

NCCL is used when every rank has its own GPU, gloo otherwise. The model is a token classifier:
SKLinear -> ReLU -> RandMultiHeadAttention (when this build has it) -> mean over tokens -> SKLinear.

Seeding: every rank calls ``torch.manual_seed(args.seed)`` *before* building the model, so the fixed
sketches (``U1s``/``U2s``) and random features (``projection_matrix``) are identical on all ranks;
DDP would also broadcast rank 0's parameters and buffers at construction. The data sampler is
seeded separately per epoch (``DistributedSampler.set_epoch``) so each rank sees its own shard.
Rank 0 prints the global mean training loss once per epoch.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import panther as pr


class TokenClassifier(nn.Module):
    def __init__(self, dim: int, classes: int, heads: int, features: int) -> None:
        super().__init__()
        self.proj = pr.nn.SKLinear(dim, dim, num_terms=2, low_rank=max(1, dim // 8))
        self.attn = None
        if hasattr(pr.nn, "RandMultiHeadAttention"):
            self.attn = pr.nn.RandMultiHeadAttention(dim, heads, features, dropout=0.0)
            self.norm = nn.LayerNorm(dim)
        self.head = pr.nn.SKLinear(dim, classes, num_terms=1, low_rank=max(1, dim // 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, classes)
        h = torch.relu(self.proj(x))
        if self.attn is not None:
            a, _ = self.attn(h, h, h)
            h = self.norm(h + a)
        return self.head(h.mean(dim=1))


def synthetic_data(n: int, seq_len: int, dim: int, classes: int, seed: int) -> TensorDataset:
    """Each class has a prototype token sequence; samples are noisy copies (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, seq_len, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = protos[labels] + 0.8 * torch.randn(n, seq_len, dim, generator=g)
    return TensorDataset(x, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=32, help="random features of the attention")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*sketch numbers")  # tiny demo sizes

    if "RANK" not in os.environ:  # plain `python examples/ddp_train.py`: a world of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() >= world
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)

    # Same seed on every rank before construction: identical sketches and random features.
    torch.manual_seed(args.seed)
    model = TokenClassifier(args.dim, args.classes, args.heads, args.features).to(device)
    model = DDP(model, device_ids=[local_rank] if use_cuda else None)

    data = synthetic_data(args.samples, args.seq_len, args.dim, args.classes, seed=args.seed + 1)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    if rank == 0:
        print(f"world={world} backend={dist.get_backend()} device={device} "
              f"attention={'yes' if model.module.attn is not None else 'no'} "
              f"params={sum(p.numel() for p in model.parameters()):,}", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=device)  # (sum of losses, batches)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {(total[0] / total[1]).item():.4f}", flush=True)
    # Every rank reaches this point before any tears down: a rank that destroys its gloo group
    # while a peer is still mid-collective can abort that peer ("terminate called without an
    # active exception", seen once under load in CI-like runs).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
