"""Expert parallelism over torch.distributed: experts sharded across the ranks of a process group,
tokens exchanged with two all-to-alls (dispatch and combine), forward and backward.

    layer = moe_ext.MoELayer(H, F, E, k, ...)          # same seed / weights on every rank
    ep_layer = moe_ext.parallel.shard_experts(layer, group)   # keeps a contiguous range of experts
    y = ep_layer(x)                                    # x: this rank's tokens [..., H]

Forward on each rank (W ranks in the group, E_l local experts: E // W or one more, T local tokens):

 1. route locally: router GEMM (replicated router), topk_gating over all E experts, optional capacity
    (computed from the local T, as the unsharded layer on this rank's tokens would);
 2. permute by GLOBAL expert id: rows come out grouped by expert, hence by destination rank, since
    every rank owns a contiguous range of experts;
 3. exchange the per-expert counts [E] (all_to_all_single, each rank's E_l ints to it): rank r learns how
    many rows every source rank sends to each of its local experts;
 4. HOST SYNC (the only one): one .tolist() of [send rows per rank, receive rows per rank] (2W
    ints). all_to_all_single with uneven splits needs its split sizes as Python ints, and the receive
    buffer needs its row count. Nothing else leaves the device: the regrouping below uses
    repeat_interleave with the host-known output_size, and every other size is static.
    (overflow="reroute" runs the capacity_reroute op on the device: no further host sync.)
 5. dispatch all-to-all of the rows (uneven splits); they arrive grouped by (source rank, expert);
 6. regroup them by local expert (moe_ext.permute with local ids built from the received counts),
    run the local experts (expert_ffn over the grouped rows), undo the regrouping (unpermute);
 7. combine all-to-all (the reverse splits), then unpermute with the routing weights.

Backward runs the same two all-to-alls in reverse (an autograd Function around
dist.all_to_all_single whose backward is the all-to-all with the splits swapped), so the input
gradient comes back to the token's rank, and each expert's weight gradient on its owner sums the
contributions of every rank's tokens. Router and shared-expert gradients stay per rank (each rank
differentiates its own tokens): all-reduce them over the world with all_reduce_gradients, which also
all-reduces expert gradients over the data-parallel group when EP runs inside DP (make_ep_dp_groups).

Routing is per rank: capacity ceil(cf * T * k / E) uses this rank's T, and routing="expert_choice"
lets each expert choose among each rank's own tokens (C from the local T), so an EP layer gives, on
every rank, exactly what the unsharded layer gives on that rank's tokens.
"""
import copy
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as MF
from .modules import Experts, MoELayer, check_layer_input

__all__ = ["ExpertParallelMoELayer", "shard_experts", "expert_range", "expert_ranges", "make_ep_dp_groups", "EPDPGroups",
           "all_reduce_gradients", "all_to_all"]


def _timed(stats: Optional[dict], key: str, fn):
    if stats is None:
        return fn()
    t0 = time.perf_counter()
    out = fn()
    stats[key] = stats.get(key, 0.0) + time.perf_counter() - t0
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward is the reverse all-to-all.

    The same rule as torch.distributed.nn.functional.all_to_all_single (deprecated in torch 2.14),
    plus optional timing into a stats dict (keys "comm_s", "comm_calls")."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):
        ctx.splits = (out_splits, in_splits)
        ctx.group, ctx.stats, ctx.in_rows = group, stats, x.shape[0]
        return _a2a(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.stats), None, None, None, None


def _a2a(x: Tensor, out_splits, in_splits, group, stats):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))

    def run():
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        if stats is not None and out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    if stats is not None:
        stats["comm_calls"] = stats.get("comm_calls", 0) + 1
    return _timed(stats, "comm_s", run)


def all_to_all(x: Tensor, out_splits, in_splits, group=None, stats: Optional[dict] = None) -> Tensor:
    """Differentiable uneven all_to_all_single along dim 0: rows x[sum(in_splits[:i]) : ...] go to
    rank i; returns [sum(out_splits), ...], rows from rank i in block i. Split sizes are Python ints."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, stats)


def expert_ranges(num_experts: int, world_size: int):
    """Every rank's contiguous expert range [lo, hi): E // W experts each, one more for the first E % W
    ranks (E = 60 over 8 ranks: 8, 8, 8, 8, 7, 7, 7, 7). Every rank holds at least one expert."""
    if world_size < 1:
        raise ValueError(f"moe_ext.parallel: the expert-parallel group size must be >= 1, got {world_size}")
    if num_experts < world_size:
        raise ValueError(f"moe_ext.parallel: num_experts = {num_experts} is smaller than the expert-parallel group "
                         f"size {world_size}; every rank must hold at least one expert (use a smaller group)")
    base, extra = divmod(num_experts, world_size)
    bounds = [r * base + min(r, extra) for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def expert_range(num_experts: int, world_size: int, rank: int):
    """This rank's contiguous expert range [lo, hi) (see expert_ranges)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"moe_ext.parallel: rank {rank} is not in a group of size {world_size}")
    return expert_ranges(num_experts, world_size)[rank]


class ExpertParallelMoELayer(nn.Module):
    """An MoELayer whose routed experts are sharded over a process group (see the module docstring).

    Same forward contract as MoELayer: x [..., H] -> same shape; after each forward .aux_loss (this
    rank's tokens) and .last_stats ("tokens_per_expert" [E]: this rank's kept slots per global expert,
    "drop_fraction", "router_entropy", plus "tokens_per_local_expert" [E_l]: rows this rank's experts
    received from all ranks). .last_comm: rows and bytes sent to other ranks by the last forward's
    dispatch and combine (host ints, known anyway for the split sizes). Set .comm_stats = {} to
    accumulate the seconds spent inside the all-to-alls, forward and backward ("comm_s"; on CUDA this
    adds a device sync per all-to-all, so leave it None outside benchmarks).

    Parameters: .router.weight [E, H] (replicated), .experts.w1 [E_l, 2F | F, H], .experts.w2
    [E_l, H, F] (+ .experts.b1/.b2) for the experts .local_expert_ids, .shared_experts (replicated).
    """

    def __init__(self, layer: MoELayer, group=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("moe_ext.parallel.shard_experts: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if not isinstance(layer, MoELayer):
            raise TypeError(f"moe_ext.parallel.shard_experts: expected a moe_ext.MoELayer, got {type(layer).__name__}")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        E = layer.num_experts
        ranges = expert_ranges(E, self.ep_size)
        lo, hi = ranges[self.ep_rank]
        self.num_local_experts = hi - lo
        self.expert_ranges = ranges
        self.local_expert_ids = list(range(lo, hi))
        for name in MoELayer.ROUTING_ATTRS + ("attach_aux_loss", "aux_loss_grad_scale", "recompute"):
            setattr(self, name, getattr(layer, name))
        self.router = copy.deepcopy(layer.router)
        src = layer.experts
        experts = Experts.__new__(Experts)
        nn.Module.__init__(experts)
        experts.activation = src.activation
        for name in ("w1", "w2", "b1", "b2"):
            p = getattr(src, name)
            setattr(experts, name, None if p is None else
                    nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
        self.experts = experts
        self.shared_experts = copy.deepcopy(layer.shared_experts)
        self.shared_expert_gate = copy.deepcopy(getattr(layer, "shared_expert_gate", None))
        self.aux_loss: Tensor = torch.zeros(())
        self.last_stats: dict = {}
        self.last_comm: dict = {}
        self.comm_stats: Optional[dict] = None

    # Routing, shared experts and statistics are MoELayer's own (expert bias, shared-expert gate...).
    capacity = MoELayer.capacity
    route = MoELayer.route
    _shared = MoELayer._shared
    _record = MoELayer._record
    _with_aux_loss = MoELayer._with_aux_loss

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """As MoELayer.forward; padding (token_mask False) is routed nowhere, so it is never sent."""
        shape = x.shape
        H = shape[-1]
        token_mask = check_layer_input(x, token_mask, self.router.weight, "moe_ext.parallel")
        x = x.reshape(-1, H)
        W, El, E = self.ep_size, self.num_local_experts, self.num_experts
        r = self.route(x, token_mask)
        weights, ids, max_rows = r.weights, r.expert_ids, r.max_rows

        # Rows grouped by global expert = grouped by destination rank (contiguous expert ranges); under
        # autocast in its dtype, which halves the bytes the all-to-alls move.
        x_sorted, offsets, row_map = MF.permute(MF._expert_rows(x), ids, E, max_rows)
        counts = offsets[1:] - offsets[:-1]  # [E] int64, on the device
        per_rank = [hi - lo for lo, hi in self.expert_ranges]  # rank r holds the next per_rank[r] experts
        recv_counts = counts.new_empty(W * El)  # rows from source s for local expert e at s*E_l+e
        _timed(self.comm_stats, "comm_s",
               lambda: dist.all_to_all_single(recv_counts, counts, [El] * W, per_rank, group=self.group))
        # Rows for each destination rank: the counts summed over its expert range (ranges may differ).
        # (offsets[hi] are views: no index tensor to copy to the device, which would synchronise.)
        ends = torch.stack([offsets[hi] for _, hi in self.expert_ranges])
        send_rows = ends - torch.cat([offsets[:1], ends[:-1]])
        # The one host sync: split sizes for the uneven all-to-alls must be Python ints.
        sizes = torch.cat([send_rows, recv_counts.view(W, El).sum(1)]).tolist()
        send_splits, recv_splits = sizes[:W], sizes[W:]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        recv = all_to_all(x_sorted[:n_send], recv_splits, send_splits, self.group, self.comm_stats)
        recompute = getattr(self, "recompute", False)
        if recompute or (El > 1 and W > 1):
            # Arrived grouped by (source rank, local expert): regroup by local expert. With recompute the
            # regrouping goes through permute_expert_ffn, whose backward recomputes the grouped rows and
            # the activation; with one local expert it is then the identity, a copy the else branch avoids.
            local_ids = torch.arange(El, device=x.device).repeat(W)
            local_ids = torch.repeat_interleave(local_ids, recv_counts, output_size=n_recv).view(-1, 1)
            if recompute:
                ex = self.experts
                y_local, local_offsets, local_map = MF.permute_expert_ffn(
                    recv, local_ids, El, ex.w1, ex.w2, ex.activation, ex.b1, ex.b2, recompute=True)
            else:
                x_local, local_offsets, local_map = MF.permute(recv, local_ids, El)
                y_local = self.experts(x_local, local_offsets)
            y_recv = MF.unpermute(y_local, local_map)
        else:
            # One local expert (or one rank): the received rows are already grouped by local expert.
            local_offsets = torch.zeros(El + 1, dtype=torch.int64, device=x.device)
            torch.cumsum(recv_counts.view(W, El).sum(0), 0, out=local_offsets[1:])
            y_recv = self.experts(recv, local_offsets)
        y_sorted = all_to_all(y_recv, send_splits, recv_splits, self.group, self.comm_stats)
        y = MF.unpermute(y_sorted, row_map, weights)
        if self.shared_experts is not None:
            y = y + self._shared(x)

        self._record(r, offsets, shape)
        self.last_stats["tokens_per_local_expert"] = (local_offsets[1:] - local_offsets[:-1]).to(torch.int32)
        me = self.ep_rank
        self.last_comm = {
            "dispatch_rows_sent": n_send - send_splits[me], "combine_rows_sent": n_recv - recv_splits[me],
            "dispatch_bytes_sent": (n_send - send_splits[me]) * H * x_sorted.element_size(),
            "combine_bytes_sent": (n_recv - recv_splits[me]) * H * y_recv.element_size(),
            "send_splits": send_splits, "recv_splits": recv_splits,
        }
        return MF._layer_output(self._with_aux_loss(y, x), shape)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local_expert_ids=[{self.local_expert_ids[0]}..."
                f"{self.local_expert_ids[-1]}], ep_rank={self.ep_rank}, ep_size={self.ep_size}, top_k={self.top_k}")


def shard_experts(layer: MoELayer, group=None) -> ExpertParallelMoELayer:
    """A module holding only this rank's experts of `layer` (contiguous ranges over `group`, default
    the world), routing over all E experts with a copy of the router. Every rank must pass a layer with
    the same weights (same seed or a broadcast). The returned module copies what it keeps: drop `layer`
    to free the other experts. E need not divide by the group size (expert_ranges); E < group size
    raises ValueError."""
    return ExpertParallelMoELayer(layer, group)


class EPDPGroups(NamedTuple):
    """This rank's groups: ep_group (its expert-parallel peers: contiguous ranks) and dp_group (the
    ranks holding the same experts: ranks equal modulo ep_size)."""
    ep_group: object
    dp_group: object
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int


def make_ep_dp_groups(ep_size: int, timeout=None) -> EPDPGroups:
    """Split the world into EP groups {i*ep_size .. (i+1)*ep_size - 1} and DP groups {j, j+ep_size, ...}.

    Collective: every rank must call it (dist.new_group requires every rank to create every group in
    the same order, which this function does)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"moe_ext.parallel.make_ep_dp_groups: ep_size = {ep_size} must divide the world size {world}")
    dp_size = world // ep_size
    kw = {} if timeout is None else {"timeout": timeout}
    ep_group = dp_group = None
    for i in range(dp_size):
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        g = dist.new_group(ranks, **kw)
        if rank in ranks:
            ep_group = g
    for j in range(ep_size):
        ranks = list(range(j, world, ep_size))
        g = dist.new_group(ranks, **kw)
        if rank in ranks:
            dp_group = g
    return EPDPGroups(ep_group, dp_group, ep_size, dp_size, rank % ep_size, rank // ep_size)


def _all_reduce_flat(tensors, group):
    if not tensors:
        return
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        i = 0
        for t in ts:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()


@torch.no_grad()
def all_reduce_gradients(module: nn.Module, dp_group=None, average: bool = False, world_group=None) -> None:
    """All-reduce the gradients of a model holding ExpertParallelMoELayers, after backward.

    Expert parameters (the sharded .experts of every ExpertParallelMoELayer) are summed over dp_group
    (the ranks holding the same experts; None or size 1: nothing to do): their gradient on each EP rank
    already sums every EP peer's tokens. Every other parameter (router, shared experts, the rest of the
    model: replicated) is summed over world_group (default: the whole world). The result is the
    gradient of the SUM of every rank's loss; average=True divides everything by the world size
    (gradient of the mean of the ranks' losses). Collective: every rank must call it."""
    expert_params = set()
    for m in module.modules():
        if isinstance(m, ExpertParallelMoELayer):
            expert_params.update(id(p) for p in m.experts.parameters())
    expert, other = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must contribute the same tensors, or the collective mismatches
            p.grad = torch.zeros_like(p)
        (expert if id(p) in expert_params else other).append(p.grad)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        _all_reduce_flat(expert, dp_group)
    _all_reduce_flat(other, world_group)
    if average:
        n = dist.get_world_size(world_group)
        for g in expert + other:
            g.div_(n)
