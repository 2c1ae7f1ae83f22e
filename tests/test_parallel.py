"""Expert parallelism over gloo: spawned CPU processes on 127.0.0.1, compared with the unsharded layer
on every rank's own tokens (outputs, input gradients, expert gradients summed over ranks), float64.

Every collective has a 60 s timeout and every launch a join deadline (moe_ext._dist_launch.launch
terminates all workers and fails), so a bug fails the test instead of hanging it. Each launch runs
several cases to amortise process start-up."""
import contextlib

import pytest
import torch

import moe_ext
from moe_ext._dist_launch import launch
from moe_ext.parallel import expert_range, expert_ranges

TIMEOUT_S = 150


def _make_layer(c):
    torch.manual_seed(1234)
    layer = moe_ext.MoELayer(c["H"], c["F"], c["E"], c["k"], **c.get("kw", {})).to(_dtype(c))
    if getattr(layer.router, "expert_bias", None) is not None:
        layer.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, c["E"]))
    if layer.router.bias is not None:
        with torch.no_grad():
            layer.router.bias.copy_(torch.linspace(0.4, -0.4, c["E"]))
    return layer


def _dtype(c):
    """float64, or float32 parameters for a case run under torch.autocast (bf16 experts)."""
    return torch.float32 if c.get("autocast") else torch.float64


def _autocast(c):
    return torch.autocast("cpu", dtype=torch.bfloat16) if c.get("autocast") else contextlib.nullcontext()


def _inputs(r, c):
    g = torch.Generator().manual_seed(100 + r)
    T = c["Ts"][r]
    x = torch.randn(T, c["H"], generator=g, dtype=_dtype(c))
    gy = torch.randn(T, c["H"], generator=g, dtype=_dtype(c))
    if c.get("batch_dims"):
        x, gy = x.view(1, T, c["H"]), gy.view(1, T, c["H"])
    return x, gy


def _mask(x, c):
    """With c["pad"]: the last two tokens of every rank are padding."""
    if not c.get("pad"):
        return None
    T = x.shape[-2]
    return (torch.arange(T) < T - 2).expand(x.shape[:-1])


def _check_case(rank, world, c, groups):
    import torch.distributed as dist
    from moe_ext.parallel import all_reduce_gradients, shard_experts
    # Under autocast the experts' weight gradients sum the ranks' rows in one bf16 GEMM instead of per rank.
    close = dict(atol=2e-2, rtol=2e-2) if c.get("autocast") else dict(atol=1e-12, rtol=1e-10)
    full = _make_layer(c)
    ep = shard_experts(full, groups.ep_group if groups else None)
    # The reference: the default path, adding .aux_loss to its loss (ep may attach it, or recompute).
    full.attach_aux_loss = full.recompute = False
    ep_size = groups.ep_size if groups else world
    ep_rank = dist.get_rank(groups.ep_group) if groups else rank
    lo, hi = expert_range(c["E"], ep_size, ep_rank)
    El = hi - lo
    assert ep.local_expert_ids == list(range(lo, hi))
    assert ep.experts.w1.shape[0] == El and isinstance(ep.experts.w1, torch.nn.Parameter)
    assert ep.experts.w2.shape == (El,) + tuple(full.experts.w2.shape[1:])
    # Reference: the unsharded layer on each rank's own tokens; gradients summed over all ranks.
    ref = {n: torch.zeros_like(p) for n, p in full.named_parameters()}
    for r in range(world):
        x, gy = _inputs(r, c)
        x.requires_grad_()
        full.zero_grad()
        with _autocast(c):
            y = full(x, token_mask=_mask(x, c))
        ((y * gy).sum() + full.aux_loss).backward()
        for n, p in full.named_parameters():
            ref[n] += p.grad
        if r == rank:
            y_ref, gx_ref, aux_ref = y.detach(), x.grad, full.aux_loss.detach()
            tpe_ref, drop_ref = full.last_stats["tokens_per_expert"], full.last_stats["drop_fraction"]
    x, gy = _inputs(rank, c)
    x.requires_grad_()
    with _autocast(c):
        y = ep(x, token_mask=_mask(x, c))
    assert y.shape == x.shape
    ((y * gy).sum() + ep.aux_loss).backward()
    all_reduce_gradients(ep, groups.dp_group if groups else None)
    torch.testing.assert_close(y, y_ref, **close)
    torch.testing.assert_close(x.grad, gx_ref, **close)
    torch.testing.assert_close(ep.aux_loss.detach(), aux_ref, **close)
    assert torch.equal(ep.last_stats["tokens_per_expert"], tpe_ref)
    torch.testing.assert_close(ep.last_stats["drop_fraction"], drop_ref)
    lo, hi = ep.local_expert_ids[0], ep.local_expert_ids[-1] + 1
    names = [n for n, _ in ep.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in full.named_parameters())
    for n, p in ep.named_parameters():
        want = ref[n][lo:hi] if n.startswith("experts.") else ref[n]
        torch.testing.assert_close(p.grad, want, **close, msg=lambda m: f"rank {rank} grad {n}: {m}")
    comm, row_bytes = ep.last_comm, c["H"] * (2 if c.get("autocast") else 8)  # bf16 rows under autocast
    assert comm["dispatch_bytes_sent"] == comm["dispatch_rows_sent"] * row_bytes
    assert comm["combine_bytes_sent"] == comm["combine_rows_sent"] * row_bytes
    return {"rank": rank, "T": c["Ts"][rank], "received": ep.last_stats["tokens_per_local_expert"].tolist(),
            "comm": ep.last_comm}


def _cases_worker(rank, world, runs, check_errors=False):
    """runs: [(ep_size or None for pure EP, [case, ...]), ...] in one set of processes."""
    from moe_ext.parallel import make_ep_dp_groups
    if check_errors:
        _check_errors()
    out = []
    for ep_size, cases in runs:
        groups = make_ep_dp_groups(ep_size) if ep_size else None
        out += [_check_case(rank, world, c, groups) for c in cases]
    return out


def _check_errors():
    from moe_ext.parallel import shard_experts
    with pytest.raises(ValueError, match=r"num_experts = 1 is smaller than the expert-parallel group size 2"):
        shard_experts(moe_ext.MoELayer(8, 8, 1, 1))
    with pytest.raises(TypeError, match="MoELayer"):
        shard_experts(torch.nn.Linear(2, 2))


def test_expert_parallel_two_ranks_matches_unsharded():
    base = dict(H=12, F=10, E=4, k=2)
    cases = [
        # Two local experts per rank (regrouping path), biases, losses, uneven T.
        dict(base, Ts=[7, 12], kw=dict(bias=True, aux_loss_coef=0.01, z_loss_coef=0.001)),
        # A rank with no tokens, capacity with drops, batch dims.
        dict(base, Ts=[0, 9], kw=dict(capacity_factor=0.75, aux_loss_coef=0.01), batch_dims=True),
        dict(base, Ts=[11, 0], kw=dict(capacity_factor=1.0)),
        # One local expert per rank, top-1, shared experts, non-gated activation, sigmoid scores.
        dict(H=8, F=6, E=2, k=1, Ts=[5, 6], kw=dict(num_shared_experts=1, activation="gelu_no_mul",
                                                   score_func="sigmoid")),
        # Every rank's tokens on one rank's experts is possible; also top-k = E.
        dict(H=8, F=6, E=4, k=4, Ts=[3, 2]),
        # DeepSeek/Qwen2 options come from MoELayer.route/_shared: selection bias, groups, gated shared expert.
        dict(base, Ts=[5, 7], kw=dict(score_func="sigmoid", expert_bias=True, n_group=2, topk_group=1,
                                      num_shared_experts=1, shared_expert_gate=True)),
        # Routing policies are per rank, so they shard unchanged.
        dict(base, Ts=[9, 6], kw=dict(capacity_factor=0.5, overflow="reroute")),
        dict(base, Ts=[8, 5], kw=dict(capacity_factor=0.5, drop_policy="probs")),
        dict(base, Ts=[6, 9], kw=dict(routing="expert_choice", capacity_factor=1.0)),
        # fp32 parameters under torch.autocast: bf16 rows cross the ranks, fp32 gradients come back.
        dict(base, Ts=[7, 10], kw=dict(bias=True, aux_loss_coef=0.01), autocast=True),
        # The aux loss attached to the output (reentrant checkpointing): .aux_loss is detached.
        dict(base, Ts=[4, 8], kw=dict(aux_loss_coef=0.1, z_loss_coef=0.01, attach_aux_loss=True)),
        # recompute=True on the local experts, several per rank and one (E=2).
        dict(base, Ts=[9, 4], kw=dict(bias=True, recompute=True)),
        dict(H=8, F=6, E=2, k=1, Ts=[3, 7], kw=dict(recompute=True, activation="gelu_no_mul")),
        # Padding (token_mask): never dispatched, out of the losses; with capacity and batch dims.
        dict(base, Ts=[6, 9], kw=dict(aux_loss_coef=0.1, z_loss_coef=0.01), pad=True),
        dict(base, Ts=[5, 8], kw=dict(capacity_factor=0.75, aux_loss_coef=0.1), pad=True, batch_dims=True),
        # Uneven expert ranges: E=5 over two ranks holds 3 + 2; E=3 holds 2 + 1 (the one-expert branch).
        dict(H=8, F=6, E=5, k=2, Ts=[9, 6], kw=dict(bias=True, aux_loss_coef=0.01)),
        dict(H=8, F=6, E=3, k=2, Ts=[5, 8], kw=dict(recompute=True)),
        dict(H=8, F=6, E=3, k=3, Ts=[4, 0], kw=dict(capacity_factor=0.6)),
    ]
    # Also: E < world is a clear error (see test_expert_ranges).
    out = launch(_cases_worker, 2, [(None, cases)], True, timeout_s=TIMEOUT_S)
    # Sanity: tokens actually crossed ranks.
    assert sum(r[0]["comm"]["dispatch_rows_sent"] for r in out) > 0
    assert out[0][1]["T"] == 0 and out[0][1]["comm"]["dispatch_rows_sent"] == 0


def test_expert_parallel_four_ranks_ep2_dp2_and_pure_ep():
    # EP=2 x DP=2: expert grads all-reduced over the DP group, router/shared grads over the world.
    ep_dp = [dict(H=10, F=8, E=4, k=2, Ts=[5, 0, 8, 3], kw=dict(bias=True, num_shared_experts=1,
                                                                aux_loss_coef=0.01))]
    pure = [dict(H=10, F=8, E=8, k=3, Ts=[4, 9, 0, 6]),
            dict(H=10, F=8, E=7, k=3, Ts=[6, 2, 5, 8])]  # uneven: 2, 2, 2, 1 experts
    out = launch(_cases_worker, 4, [(2, ep_dp), (None, pure)], timeout_s=TIMEOUT_S)
    assert [o[0]["comm"]["send_splits"].__len__() for o in out] == [2] * 4
    assert [o[1]["comm"]["send_splits"].__len__() for o in out] == [4] * 4
    assert [o[2]["received"].__len__() for o in out] == [2, 2, 2, 1]


def test_expert_ranges():
    # In a live group too: test_expert_parallel_two_ranks_matches_unsharded (check_errors).
    assert expert_range(6, 3, 2) == (4, 6)
    assert expert_ranges(60, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 39), (39, 46), (46, 53), (53, 60)]
    assert expert_ranges(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    with pytest.raises(ValueError, match="num_experts = 3 is smaller than the expert-parallel group size 4"):
        expert_range(3, 4, 0)
    with pytest.raises(ValueError, match="rank 4 is not in a group of size 4"):
        expert_range(8, 4, 4)


def _hang_worker(rank, world):
    import time
    if rank == 0:
        time.sleep(60)
    return rank


def test_launcher_fails_instead_of_hanging():
    with pytest.raises(RuntimeError, match="timed out"):
        launch(_hang_worker, 2, timeout_s=3)


def _fail_worker(rank, world):
    import torch.distributed as dist
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # would wait for rank 1 until the collective timeout; the launcher terminates it
    return rank


def test_launcher_reports_worker_failure_quickly():
    import time
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        launch(_fail_worker, 2, timeout_s=TIMEOUT_S)
    assert time.monotonic() - t0 < 45


def test_parallel_bench_runs():
    from moe_ext import parallel_bench
    res = parallel_bench.run(world=2, tokens=64, hidden=32, ffn=32, experts=4, topk=2, iters=2, warmup=1,
                             timeout_s=TIMEOUT_S)
    assert len(res) == 2
    for r in res:
        assert r["model_bytes_fwd"] == 2 * 2 * 64 * 32 * 0.5 * 4
        assert 0 < r["measured_bytes_fwd"] <= 2 * 2 * 64 * 32 * 4
        assert 0 <= r["comm_s"] <= r["step_s"]
    table = parallel_bench.format_table(res)
    assert "comm" in table and len(table.splitlines()) == 3


def _fsdp2_worker(rank, world):
    import warnings
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    c = dict(H=12, F=10, E=4, k=2, Ts=[7, 5], kw=dict(bias=True, aux_loss_coef=0.1, num_shared_experts=1))
    ref, model = _make_layer(c), _make_layer(c)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))  # every parameter sharded along dim 0
    want = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for r in range(world):
        ref.zero_grad()
        x, gy = _inputs(r, c)
        ((ref(x) * gy).sum() + ref.aux_loss).backward()
        for n, p in ref.named_parameters():
            want[n] += p.grad / world  # FSDP averages over ranks
        if r == rank:
            y_ref = ref(x).detach()
    x, gy = _inputs(rank, c)
    x = x.view(1, -1, c["H"])  # batch dims: the output reshaped back must not be a view (FSDP2 warns)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*returned a view tensor")
        y = model(x)
    torch.testing.assert_close(y.view_as(y_ref), y_ref, atol=1e-12, rtol=1e-10)
    ((y.view_as(gy) * gy).sum() + model.aux_loss).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), want[n], atol=1e-12, rtol=1e-10,
                                   msg=lambda m: f"rank {rank} grad {n}: {m}")
    return sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")


def test_fsdp2_fully_shard_matches_unsharded():
    """torch.distributed.fsdp.fully_shard (FSDP2) over two gloo ranks: the parameters are DTensors sharded
    along dim 0 (the experts' w1/w2 along E), all-gathered for the forward; the gradients, averaged over the
    ranks, equal the unsharded layer's."""
    out = launch(_fsdp2_worker, 2, timeout_s=TIMEOUT_S)
    assert "experts.w1" in out[0] and "router.weight" in out[0]


def _global_aux_worker(rank, world):
    import copy
    import torch.distributed as dist
    group = dist.new_group(list(range(world)))
    c = dict(H=12, F=10, E=5, k=2, Ts=[7, 0, 11][:world],
             kw=dict(aux_loss_coef=0.1, aux_loss_scope="global", aux_loss_group=group))
    layer = copy.deepcopy(_make_layer(c))  # a deep copy shares the process group (which cannot be copied)
    assert layer.aux_loss_group is group
    x, _ = _inputs(rank, c)
    layer(x)  # a rank without tokens takes part in the all-reduce too
    # Reference: the counts of every rank's tokens (each rank can route them: the same router), P local.
    counts = sum(layer.route(_inputs(r, c)[0]).tokens_chosen.double() for r in range(world))
    r = layer.route(x)
    p = r.score_sum / max(x.shape[0], 1)
    want = 0.1 * c["E"] * (counts / counts.sum() * p).sum()
    torch.testing.assert_close(layer.aux_loss, want.to(layer.aux_loss.dtype), atol=1e-12, rtol=1e-10)
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router.weight, allow_unused=True)
    (w,) = torch.autograd.grad(want, layer.router.weight, allow_unused=True)
    if x.shape[0]:
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    return float(layer.aux_loss.detach())


def test_global_batch_aux_loss_sums_the_counts_over_ranks():
    out = launch(_global_aux_worker, 3, timeout_s=TIMEOUT_S)
    assert out[1] == 0.0 and out[0] > 0 and out[2] > 0


def _random_cases(n, world, seed):
    """n random layer configurations (every option expert parallelism takes) with random token counts per
    rank, some zero: the options drawn together, as tests/test_layer_fuzz.py draws them for one process."""
    import random
    rnd = random.Random(seed)
    cases = []
    for _ in range(n):
        E = rnd.randint(world, 9)
        k = rnd.randint(1, E)
        kw = dict(activation=rnd.choice(["silu", "gelu", "swigluoai", "gelu_no_mul", "relu_no_mul"]),
                  bias=rnd.random() < 0.5, router_bias=rnd.random() < 0.3,
                  score_func=rnd.choice(["softmax", "sigmoid"]), renormalize=rnd.random() < 0.5,
                  aux_loss_coef=rnd.choice([0.0, 0.1]), z_loss_coef=rnd.choice([0.0, 0.01]),
                  recompute=rnd.random() < 0.3, attach_aux_loss=rnd.random() < 0.2,
                  routed_scaling_factor=rnd.choice([1.0, 2.5]), expert_bias=rnd.random() < 0.3)
        if rnd.random() < 0.2:
            kw = dict(routing="expert_choice", capacity_factor=rnd.choice([0.5, 1.0, 2.0]),
                      activation=kw["activation"], recompute=kw["recompute"])
        elif rnd.random() < 0.5:
            kw["capacity_factor"] = rnd.choice([0.5, 0.75, 1.25])
            kw["overflow"], kw["drop_policy"] = rnd.choice([("drop", "position"), ("drop", "probs"),
                                                            ("reroute", "position")])
        if rnd.random() < 0.3:
            kw.update(num_shared_experts=rnd.randint(1, 2), shared_expert_gate=rnd.random() < 0.5)
        cases.append(dict(H=rnd.choice([4, 8, 12]), F=rnd.choice([3, 6]), E=E, k=k, kw=kw,
                          Ts=[rnd.choice([0, 1, 5, 9, 13]) for _ in range(world)], pad=rnd.random() < 0.3,
                          batch_dims=rnd.random() < 0.3))
    return cases


def test_expert_parallel_random_cases_three_ranks():
    """24 random option combinations over 3 ranks (uneven expert ranges whenever 3 does not divide E), each
    against the unsharded layer on every rank's tokens: outputs, aux loss, statistics, all gradients."""
    cases = _random_cases(24, 3, seed=7)
    out = launch(_cases_worker, 3, [(None, cases)], timeout_s=TIMEOUT_S)
    assert sum(r["comm"]["dispatch_rows_sent"] for o in out for r in o) > 0
