"""Expert parallelism under torchrun: one MoE layer, experts sharded over all ranks, a few SGD steps.

    torchrun --nproc_per_node=2 examples/ep_torchrun.py            # CPU, gloo
    torchrun --nproc_per_node=4 examples/ep_torchrun.py --ep 2     # EP=2 x DP=2

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; init_process_group reads them (env://).
With CUDA available each rank uses cuda:LOCAL_RANK and NCCL, otherwise gloo on the CPU.
"""
import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import moe_ext
from moe_ext.parallel import all_reduce_gradients, make_ep_dp_groups, shard_experts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, default=None, help="expert-parallel group size (default: the world)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    ep_size = a.ep or world
    groups = make_ep_dp_groups(ep_size)  # every rank creates every group, in the same order
    torch.manual_seed(0)  # the same full layer on every rank (or broadcast it from rank 0)
    full = moe_ext.MoELayer(64, 128, 8, 2, aux_loss_coef=0.01).to(device)
    layer = shard_experts(full, groups.ep_group)
    del full  # the sharded layer copied what it keeps
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)

    torch.manual_seed(100 + rank)  # every rank its own tokens
    x = torch.randn(a.tokens, 64, device=device)
    for step in range(a.steps):
        y = layer(x)
        loss = y.square().mean() + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        # experts: sum over the DP peers holding the same experts; router: over the world; then mean
        all_reduce_gradients(layer, groups.dp_group, average=True)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: mean loss {total.item() / world:.5f}; rank 0 holds experts {layer.local_expert_ids}, "
                  f"sent {layer.last_comm['dispatch_rows_sent']} rows to other ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
