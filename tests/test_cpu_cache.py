"""The CPU cache of large output blocks (csrc/cpu/memory.cpp): moe_ext.cpu_cache_stats / empty_cpu_cache.

CPU outputs of >= 32 MiB of gated_activation(_backward), grouped_gemm(_wgrad), permute (x_sorted),
unpermute and unpermute_backward (grad_ys) come from a cache of freed blocks (MOE_EXT_CPU_CACHE_MB, default
1024 MiB, 0 = off) that serves a request of the block's size or up to 1/8 smaller. The cache is process
global, so the tests empty it first and look at deltas of the counters.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_ext

ops = torch.ops.moe_ext
MiB = 1 << 20
LARGE = 32 * MiB
# gated_activation rows of F = 1024 fp32 columns: 4 KiB of output per row
ROW = 4 * 1024

in_process = pytest.mark.skipif(
    "MOE_EXT_CPU_CACHE_MB" in os.environ,
    reason="MOE_EXT_CPU_CACHE_MB is set for this process; the in-process tests assume the default 1024 MiB "
           "(the env-var tests below run in subprocesses)")


def stats():
    return moe_ext.cpu_cache_stats()


def delta(before, after):
    return {k: after[k] - before[k] for k in ("hits", "misses")}


def act_rows(rows, seed=0):
    """h [rows, 2048] fp32: gated_activation gives [rows, 1024] fp32 = rows * 4 KiB."""
    return torch.randn(rows, 2048, generator=torch.Generator().manual_seed(seed))


def act_chunked(h, act="silu"):
    """The op on pieces below the cache's threshold (torch's allocator): the same per-row kernel."""
    return torch.cat([ops.gated_activation(c, act) for c in h.split(1024)])


@pytest.fixture
def empty_cache():
    moe_ext.empty_cpu_cache()
    yield
    moe_ext.empty_cpu_cache()


# ------------------------------------------------------------------------------------------------ api
def test_stats_api():
    s = stats()
    assert set(s) == {"cached_bytes", "limit_bytes", "hits", "misses"}
    assert all(isinstance(v, int) and v >= 0 for v in s.values())
    assert s["cached_bytes"] <= s["limit_bytes"]
    moe_ext.empty_cpu_cache()
    assert stats()["cached_bytes"] == 0


@in_process
def test_default_limit():
    assert stats()["limit_bytes"] == 1024 * MiB


# ------------------------------------------------------------------------------------ hits and reuse
@in_process
def test_second_identical_call_hits_and_is_fresh(empty_cache):
    hA, hB = act_rows(8192, seed=1), act_rows(8192, seed=2)  # 32 MiB outputs
    s0 = stats()
    outA = ops.gated_activation(hA)
    s1 = stats()
    assert delta(s0, s1) == {"hits": 0, "misses": 1}
    assert s1["cached_bytes"] == 0
    assert torch.equal(outA, act_chunked(hA))
    outA.fill_(float("nan"))  # whatever the next user of the block does not write shows up
    del outA
    s2 = stats()
    assert s2["cached_bytes"] == LARGE
    assert delta(s1, s2) == {"hits": 0, "misses": 0}

    outB = ops.gated_activation(hB)
    s3 = stats()
    assert delta(s2, s3) == {"hits": 1, "misses": 0}
    assert s3["cached_bytes"] == 0
    assert torch.equal(outB, act_chunked(hB))
    del outB
    assert stats()["cached_bytes"] == LARGE


def _grouped_gemm_case(seed):
    g = torch.Generator().manual_seed(seed)
    M, K, N = 8192, 16, 1024                        # c: 32 MiB
    a = torch.randn(M, K, generator=g)
    b = torch.randn(4, K, N, generator=g)
    offs = torch.tensor([100, 2000, 2000, 5000, 8100])  # rows outside [100, 8100) and expert 1 empty: zeros
    def ref():
        out = torch.zeros(M, N)
        for e in range(4):
            lo, hi = int(offs[e]), int(offs[e + 1])
            out[lo:hi] = a[lo:hi] @ b[e]
        return out
    return (lambda: ops.grouped_gemm(a, b, offs)), ref


def _grouped_gemm_wgrad_case(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1024, generator=g)
    y = torch.randn(64, 2048, generator=g)
    offs = torch.tensor([0, 20, 20, 50, 64])           # out [4, 1024, 2048]: 32 MiB, expert 1 zero
    def ref():
        out = torch.zeros(4, 1024, 2048)
        for e in range(4):
            lo, hi = int(offs[e]), int(offs[e + 1])
            out[e] = x[lo:hi].t() @ y[lo:hi]
        return out
    return (lambda: ops.grouped_gemm_wgrad(x, y, offs)), ref


def _routing(seed, T, k, E, drop):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < drop] = -1  # dropped slots
    return ids


def _permute_case(seed):
    T, k, E, H, R = 2048, 2, 8, 2048, 4200           # x_sorted [4200, 2048]: 32.8 MiB
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = _routing(seed, T, k, E, drop=0.1)
    _, off, rm = ops.permute(x[:, :8], ids, E, R)     # the row layout, from a small call
    assert int(off[-1]) < R

    def ref():
        out = torch.zeros(R, H)
        t, j = (rm >= 0).nonzero(as_tuple=True)
        out[rm[t, j]] = x[t]
        return out
    return (lambda: ops.permute(x, ids, E, R)[0]), ref


def _unpermute_case(seed):
    T, E, H = 4096, 8, 2048                           # y [4096, 2048]: 32 MiB
    g = torch.Generator().manual_seed(seed)
    ids = _routing(seed, T, 1, E, drop=0.1)
    _, _, rm = ops.permute(torch.zeros(T, 1), ids, E, -1)
    ys = torch.randn(T, H, generator=g)
    w = torch.rand(T, 1, generator=g)
    return (lambda: ops.unpermute(ys, rm, w)), lambda: torch.where(rm >= 0, w, 0.0) * ys[rm.clamp(min=0).squeeze(1)]


def _unpermute_backward_case(seed):
    T, k, E, H, R = 2048, 2, 8, 2048, 4200           # grad_ys [4200, 2048]: 32.8 MiB, unused rows zero
    g = torch.Generator().manual_seed(seed)
    ids = _routing(seed, T, k, E, drop=0.1)
    _, _, rm = ops.permute(torch.zeros(T, 1), ids, E, R)
    gy = torch.randn(T, H, generator=g)
    ys = torch.randn(R, H, generator=g)
    w = torch.rand(T, k, generator=g)
    def ref():
        out = torch.zeros(R, H)
        t, j = (rm >= 0).nonzero(as_tuple=True)
        out[rm[t, j]] = w[t, j, None] * gy[t]
        return out
    return (lambda: ops.unpermute_backward(gy, ys, rm, w)[0]), ref


def _gated_activation_case(seed):
    h = act_rows(8192, seed)
    return (lambda: ops.gated_activation(h, "gelu")), lambda: act_chunked(h, "gelu")


def _gated_activation_backward_case(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2048, 4096, generator=g)          # grad_h: 32 MiB
    grad = torch.randn(2048, 2048, generator=g)
    return (lambda: ops.gated_activation_backward(grad, h, "gelu_tanh")), \
        lambda: torch.cat([ops.gated_activation_backward(gc, hc, "gelu_tanh") for gc, hc in zip(grad.split(512), h.split(512))])


CASES = {
    "gated_activation": _gated_activation_case,
    "gated_activation_backward": _gated_activation_backward_case,
    "grouped_gemm": _grouped_gemm_case,
    "grouped_gemm_wgrad": _grouped_gemm_wgrad_case,
    "permute": _permute_case,
    "unpermute": _unpermute_case,
    "unpermute_backward": _unpermute_backward_case,
}


@in_process
@pytest.mark.parametrize("op", list(CASES))
def test_op_reuses_block_without_stale_values(op, empty_cache):
    """Each op's large output comes from the cache, and a reused block (left full of NaN by its last user)
    holds only the new result: every element, zero rows included, is written."""
    runA, _ = CASES[op](1)
    runB, refB_fn = CASES[op](2)
    refB = refB_fn()
    s0 = stats()
    outA = runA()
    assert outA.nbytes >= LARGE
    s1 = stats()
    assert delta(s0, s1) == {"hits": 0, "misses": 1}
    outA.fill_(float("nan"))
    del outA
    s2 = stats()
    assert s2["cached_bytes"] >= LARGE
    outB = runB()
    s3 = stats()
    assert delta(s2, s3) == {"hits": 1, "misses": 0}
    assert not outB.isnan().any()
    if op.startswith("grouped_gemm"):
        torch.testing.assert_close(outB, refB, atol=1e-4, rtol=1e-5)
        zero = refB == 0
        assert (outB[zero] == 0).all()
    else:  # copies, one product per element, or the same kernel on smaller pieces: exact
        assert torch.equal(outB, refB)


# ------------------------------------------------------------------------------------ size matching
@in_process
def test_request_up_to_an_eighth_smaller_hits(empty_cache):
    h = act_rows(10240)                                # 40 MiB output
    out = ops.gated_activation(h)
    del out
    assert stats()["cached_bytes"] == 40 * MiB
    s0 = stats()
    out = ops.gated_activation(h[:8960])              # 35 MiB: exactly 1/8 smaller
    s1 = stats()
    assert delta(s0, s1) == {"hits": 1, "misses": 0}
    assert s1["cached_bytes"] == 0
    assert torch.equal(out, act_chunked(h[:8960]))
    del out
    assert stats()["cached_bytes"] == 40 * MiB        # the whole block comes back


@in_process
def test_request_more_than_an_eighth_smaller_misses(empty_cache):
    h = act_rows(10240)
    out = ops.gated_activation(h)
    del out
    s0 = stats()
    out = ops.gated_activation(h[:8959])              # 35 MiB - 4 KiB: more than 1/8 smaller
    s1 = stats()
    assert delta(s0, s1) == {"hits": 0, "misses": 1}
    assert s1["cached_bytes"] == 40 * MiB             # the 40 MiB block stays cached
    assert torch.equal(out, act_chunked(h[:8959]))
    del out
    assert stats()["cached_bytes"] == 40 * MiB + 8959 * ROW


@in_process
def test_larger_request_misses(empty_cache):
    h = act_rows(10240)
    out = ops.gated_activation(h[:8192])              # 32 MiB block
    del out
    s0 = stats()
    out = ops.gated_activation(h)                     # 40 MiB: no cached block is big enough
    assert delta(s0, stats()) == {"hits": 0, "misses": 1}
    assert stats()["cached_bytes"] == LARGE
    del out


@in_process
def test_small_outputs_do_not_touch_the_cache(empty_cache):
    h = act_rows(8192)
    s0 = stats()
    out = ops.gated_activation(h[:8191])              # 32 MiB - 4 KiB: torch's allocator
    del out
    out = ops.gated_activation_backward(torch.randn(7, 36), torch.randn(7, 72))
    del out
    assert stats() == s0
    out = ops.gated_activation(h)                     # exactly 32 MiB: the cache
    s1 = stats()
    assert delta(s0, s1) == {"hits": 0, "misses": 1}
    del out
    assert stats()["cached_bytes"] == LARGE


# ------------------------------------------------------------------------------ empty_cpu_cache, resize_
@in_process
def test_empty_cache_keeps_live_tensors(empty_cache):
    h1, h2 = act_rows(8192, seed=3), act_rows(8192, seed=4)
    idle = ops.gated_activation(h1)
    live = ops.gated_activation(h2)
    expect = act_chunked(h2)
    del idle
    assert stats()["cached_bytes"] == LARGE
    moe_ext.empty_cpu_cache()
    assert stats()["cached_bytes"] == 0
    # the live tensor's block is untouched by the clear, and by later allocations
    other = ops.gated_activation(h1)
    other.fill_(-1.0)
    assert torch.equal(live, expect)
    live.mul_(2)
    assert torch.equal(live, 2 * expect)
    del other
    assert stats()["cached_bytes"] == LARGE
    del live                                           # returns to the cache when it dies
    assert stats()["cached_bytes"] == 2 * LARGE
    moe_ext.empty_cpu_cache()
    assert stats()["cached_bytes"] == 0


@in_process
def test_resize_of_a_cached_output(empty_cache):
    h = act_rows(10240)
    out = ops.gated_activation(h[:8959])               # 35 MiB - 4 KiB, from a fresh block
    expect = act_chunked(h[:8959])
    old_bytes = out.nbytes
    out.resize_(10000, 1024)                           # grows: new storage, prefix copied
    assert out.shape == (10000, 1024)
    assert torch.equal(out.view(-1)[: expect.numel()], expect.view(-1))
    out.view(-1)[expect.numel():] = 3.0                # the new tail is writable
    assert (out[8959:] == 3.0).all()
    assert stats()["cached_bytes"] == old_bytes        # the old block went back to the cache
    out.resize_(100, 1024)                             # shrinks in place
    assert torch.equal(out, expect[:100])
    out.resize_(0)
    del out
    s = stats()
    assert s["cached_bytes"] <= s["limit_bytes"]
    assert s["cached_bytes"] >= old_bytes
    # the blocks are still good for new outputs
    out = ops.gated_activation(h[:8959])
    assert torch.equal(out, expect)


# ---------------------------------------------------------------------------- MOE_EXT_CPU_CACHE_MB
# Each runs in its own interpreter (the variable is read once per process); the three start together.
ENV_SCRIPTS = {
    "0": """
        import torch, moe_ext
        ops = torch.ops.moe_ext
        h = torch.randn(8192, 2048)
        expect = torch.cat([ops.gated_activation(c) for c in h.split(1024)])
        for _ in range(3):
            out = ops.gated_activation(h)
            assert torch.equal(out, expect)
            del out
        s = moe_ext.cpu_cache_stats()
        assert s == {"cached_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}, s
        print("OK")
    """,
    "40": """
        import torch, moe_ext
        ops = torch.ops.moe_ext
        MiB = 1 << 20
        h = torch.randn(12288, 2048)
        a, b = ops.gated_activation(h[:8192]), ops.gated_activation(h[:8192])   # two 32 MiB blocks
        del a, b
        s = moe_ext.cpu_cache_stats()
        assert s["limit_bytes"] == 40 * MiB and s["cached_bytes"] == 32 * MiB, s   # only one fits
        c = ops.gated_activation(h)                                            # 48 MiB: above the limit
        del c
        s = moe_ext.cpu_cache_stats()
        assert s["cached_bytes"] <= 40 * MiB and s["misses"] == 3 and s["hits"] == 0, s
        d = ops.gated_activation(h)
        assert moe_ext.cpu_cache_stats()["misses"] == 4, moe_ext.cpu_cache_stats()   # 48 MiB was not kept
        print("OK")
    """,
    "abc": """
        import json, torch, moe_ext
        ops = torch.ops.moe_ext
        errors = []
        for f in (lambda: ops.gated_activation(torch.randn(8192, 2048)), moe_ext.cpu_cache_stats,
                  lambda: ops.gated_activation(torch.randn(8192, 2048))):
            try:
                f()
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e).splitlines()[0])
        small = ops.gated_activation(torch.ones(4, 6))  # below 32 MiB: never touches the cache
        print(json.dumps(errors + [small.shape == (4, 3)]))
    """,
}


@pytest.fixture(scope="module")
def env_runs():
    procs = {
        value: subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                                env={**os.environ, "MOE_EXT_CPU_CACHE_MB": value},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for value, code in ENV_SCRIPTS.items()
    }
    results = {}
    for value, p in procs.items():
        out, err = p.communicate(timeout=180)
        results[value] = (p.returncode, out, err)
    return results


def test_env_zero_disables_the_cache(env_runs):
    rc, out, err = env_runs["0"]
    assert rc == 0 and out.strip() == "OK", err


def test_env_limit_bounds_the_cache(env_runs):
    rc, out, err = env_runs["40"]
    assert rc == 0 and out.strip() == "OK", err


def test_env_invalid_value_raises_on_first_use(env_runs):
    """The limit is parsed when the cache is first used, not at import: importing works, the first large
    output (and cpu_cache_stats) raise a RuntimeError naming the variable, and keep raising; small outputs
    never read it."""
    rc, out, err = env_runs["abc"]
    assert rc == 0, err
    *errors, small_ok = json.loads(out.strip())
    assert len(errors) == 3 and small_ok is True, (errors, small_ok)
    for e in errors:
        assert e is not None and "MOE_EXT_CPU_CACHE_MB" in e and '"abc"' in e, errors
