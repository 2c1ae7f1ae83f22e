"""moe_ext.offload: outputs equal the resident MoELayer's (float64) in every cache mode, the LRU policy,
rounds, prefetch accounting, and a tiny run of the cache-size bench. CPU tests run the logic-only mode."""
import pytest
import torch

import moe_ext
from moe_ext.offload import OffloadedMoE, bench_cache_sizes, offload_experts

TOL = dict(atol=1e-12, rtol=1e-10)
E, K, H, F = 6, 2, 16, 8


def make_layer(**kw):
    torch.manual_seed(0)
    opts = dict(num_experts=E, top_k=K)
    opts.update(kw)
    return moe_ext.MoELayer(H, F, opts.pop("num_experts"), opts.pop("top_k"), dtype=torch.float64, **opts).eval()


def batches(n=4, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, generator=g, dtype=torch.float64) for _ in range(n)]


def check(layer, off, xs, n):
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(off(x), layer(x), **TOL)
            assert off.num_resident() <= n
            assert torch.equal(off.last_stats["tokens_per_expert"], layer.last_stats["tokens_per_expert"])
    s = off.stats()
    assert s["max_resident"] <= min(n, layer.num_experts)
    assert s["hits"] + s["misses"] == sum(len(set(e for e in _needed(layer, x))) for x in xs)
    return s


def _needed(layer, x):
    with torch.no_grad():
        ids = layer.route(x)[2]
    return [int(e) for e in ids.flatten().tolist() if e >= 0]


@pytest.mark.parametrize("n", [1, 2, 3, E, E + 3])
def test_equals_resident_every_cache_size(n):
    layer = make_layer()
    off = offload_experts(layer, cache_experts=n, device="cpu")
    assert isinstance(off, OffloadedMoE) and not off.asynchronous
    s = check(layer, off, batches(6), n)
    assert s["forwards"] == 6 and s["host_reads"] == 6
    needed_max = max(len(set(_needed(layer, x))) for x in batches(6))
    if n < needed_max:
        assert s["rounds"] > s["forwards"] and s["evictions"] > 0
    if n >= E:
        assert s["evictions"] == 0 and s["misses"] == len({e for x in batches(6) for e in _needed(layer, x)})
    assert s["bytes_copied"] == s["misses"] * off.expert_bytes


@pytest.mark.parametrize("kw", [
    dict(bias=True),
    dict(activation="gelu_no_mul"),
    dict(activation="swigluoai", bias=True, router_bias=True),
    dict(num_shared_experts=2),
    dict(capacity_factor=0.5),
    dict(capacity_factor=0.75, overflow="reroute"),
    dict(routing="expert_choice", capacity_factor=1.0),
    dict(score_func="sigmoid", n_group=3, topk_group=2, routed_scaling_factor=2.5, renormalize=False),
    dict(num_experts=5, top_k=3),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("n", [1, 3])
def test_equals_resident_layer_options(kw, n):
    layer = make_layer(**kw)
    off = offload_experts(layer, cache_experts=n, device="cpu")
    check(layer, off, batches(3), n)


def test_lru_hits_on_repeat_and_shapes():
    layer = make_layer()
    x = torch.randn(2, 3, H, dtype=torch.float64)
    need = set(_needed(layer, x.reshape(-1, H)))
    off = offload_experts(layer, cache_experts=len(need), device="cpu")
    with torch.no_grad():
        y1 = off(x)
        s1 = off.stats()
        y2 = off(x)
    s2 = off.stats()
    assert y1.shape == x.shape
    torch.testing.assert_close(y1, y2, **TOL)
    torch.testing.assert_close(y2, layer(x), **TOL)
    assert s1["misses"] == len(need) and s1["hits"] == 0
    assert s2["misses"] == len(need) and s2["hits"] == len(need) and s2["evictions"] == 0
    assert s2["rounds"] == 2 and off.last_needed == sorted(need)


def test_lru_eviction_order():
    off = offload_experts(make_layer(), cache_experts=2, device="cpu")
    assert off.prefetch([0]) == 1 and off.prefetch([1]) == 1
    assert off.resident_experts() == [0, 1]
    off.prefetch([2])  # evicts 0, the least recently used
    assert off.resident_experts() == [1, 2]
    off.prefetch([1])  # already resident: becomes most recently used, nothing copied
    assert off.resident_experts() == [2, 1]
    off.prefetch([3])  # evicts 2
    assert off.resident_experts() == [1, 3]
    s = off.stats()
    assert s["evictions"] == 2 and s["prefetch_issued"] == 4 and s["prefetch_wasted"] == 2
    assert s["max_resident"] == 2
    # cache slots hold the right weights
    for e in off.resident_experts():
        torch.testing.assert_close(off.cache_w1[off._lru[e]], off.host_w1[e], atol=0, rtol=0)


def test_prefetch_exact_guess_gives_all_hits():
    layer = make_layer()
    xs = batches(3)
    off = offload_experts(layer, cache_experts=E, device="cpu")
    with torch.no_grad():
        for x in xs:
            need = sorted(set(_needed(layer, x)))
            off.prefetch(layer.route(x)[2])  # a tensor of routed ids (with repeats) works
            before = off.stats()
            torch.testing.assert_close(off(x), layer(x), **TOL)
            after = off.stats()
            assert after["misses"] == before["misses"]
            assert after["hits"] - before["hits"] == len(need)
    s = off.stats()
    assert s["prefetch_used"] == s["prefetch_issued"] > 0 and s["prefetch_accuracy"] == 1.0


def test_prefetch_accuracy_and_small_cache():
    layer = make_layer()
    x = batches(1)[0]
    need = sorted(set(_needed(layer, x)))
    wrong = [e for e in range(E) if e not in need]
    off = offload_experts(layer, cache_experts=2, device="cpu")
    off.prefetch(wrong[:1] + need[:1])  # one right guess, one wrong
    with torch.no_grad():
        torch.testing.assert_close(off(x), layer(x), **TOL)
    s = off.stats()
    assert s["prefetch_issued"] == 2 and s["prefetch_used"] == 1 and s["prefetch_accuracy"] == 0.5
    assert s["max_resident"] <= 2
    # more ids than slots: only the first N are taken
    off2 = offload_experts(layer, cache_experts=2, device="cpu")
    assert off2.prefetch(list(range(E)) + [-1]) == 2 and off2.resident_experts() == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        off2.prefetch([E])


def test_empty_batch_and_no_needed_experts():
    layer = make_layer(num_shared_experts=1)
    off = offload_experts(layer, cache_experts=2, device="cpu")
    x = torch.zeros(0, H, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(off(x), layer(x), **TOL)
    assert off.stats()["rounds"] == 0


def test_inference_only():
    layer = make_layer()
    off = offload_experts(layer, cache_experts=2, device="cpu")
    x = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        off(x)
    assert not any(p.requires_grad for p in off.parameters())
    y = off(x.detach())  # grad mode on, but nothing requires grad: runs under no_grad
    assert not y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(off(x), layer(x), **TOL)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cache_experts"):
        offload_experts(make_layer(), cache_experts=0, device="cpu")
    with pytest.raises(TypeError, match="MoELayer"):
        offload_experts(torch.nn.Linear(2, 2), cache_experts=1, device="cpu")


def test_bench_tiny(tmp_path):
    png = tmp_path / "offload.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    res = bench_cache_sizes([1, 2], device="cpu", scale=256, tokens=2, batches=2, repeats=1, num_experts=4,
                            out_png=None if png is None else str(png))
    assert res["scaled"] and res["shapes"]["d_model"] == 16 and res["shapes"]["d_ff"] == 56
    assert [r["cache_experts"] for r in res["results"]] == [1, 2]
    assert all(r["latency_ms"] > 0 for r in res["results"]) and res["resident_ms"] > 0
    if png is not None:
        assert png.stat().st_size > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 3, E])
def test_cuda_async_equals_resident_and_overlaps(n):
    layer = make_layer(bias=True)
    off = offload_experts(layer, cache_experts=n, device="cuda")
    assert off.asynchronous and off.host_w1.is_pinned() and off.cache_w1.is_cuda
    dev = layer.to("cuda")
    xs = [x.cuda() for x in batches(4)]
    with torch.no_grad():
        for x in xs:
            off.prefetch(off.last_needed)  # previous batch's experts as the guess
            torch.testing.assert_close(off(x), dev(x), **TOL)
            assert off.num_resident() <= n
    s = off.stats()
    assert s["max_resident"] <= n and s["copy_wait_s"] >= 0.0 and s["host_reads"] == len(xs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bench_quick(tmp_path):
    res = bench_cache_sizes([1, 4, 8], device="cuda", scale=8, tokens=4, batches=4, repeats=2,
                            out_png=str(tmp_path / "offload_cuda.png"))
    assert len(res["results"]) == 3


@pytest.mark.parametrize("kw", [{}, {"bias": True, "num_shared_experts": 1}])
def test_state_dict_carries_the_routed_experts(kw):
    """The routed experts (host tensors, not parameters) are saved under MoELayer's names and loaded
    back, and loading empties the device cache: before, state_dict left them out and load_state_dict
    reported a match while keeping the old experts."""
    a = make_layer(**kw)
    torch.manual_seed(1)
    b = moe_ext.MoELayer(H, F, E, K, dtype=torch.float64, **kw).eval()
    off_a, off_b = offload_experts(a, 2, device="cpu"), offload_experts(b, 2, device="cpu")
    sd = off_a.state_dict()
    assert {f"experts.{n}" for n in ("w1", "w2") + (("b1", "b2") if kw else ())} <= set(sd)
    assert set(sd) == set(a.state_dict())
    xs = batches()
    with torch.no_grad():
        off_b(xs[0])  # fills off_b's cache with b's experts, which loading must not leave behind
        assert off_b.num_resident() > 0
        off_b.load_state_dict(sd)
        assert off_b.num_resident() == 0
    off_b.reset_stats()  # check() counts lookups from here
    check(a, off_b, xs, 2)
    # the same names both ways: a MoELayer loads an offloaded module's state_dict, and the reverse
    c = moe_ext.MoELayer(H, F, E, K, dtype=torch.float64, **kw).eval()
    c.load_state_dict(off_a.state_dict())
    check(c, off_a, xs, 2)
    off_c = offload_experts(moe_ext.MoELayer(H, F, E, K, dtype=torch.float64, **kw).eval(), 3, device="cpu")
    off_c.load_state_dict(a.state_dict())
    check(a, off_c, xs, 3)


def test_load_state_dict_reports_missing_and_mismatched_experts():
    off = offload_experts(make_layer(), 2, device="cpu")
    sd = off.state_dict()
    del sd["experts.w2"]
    with pytest.raises(RuntimeError, match="Missing key.*experts.w2"):
        off.load_state_dict(sd)
    sd = off.state_dict()
    sd["experts.w1"] = sd["experts.w1"][:, :-1]
    with pytest.raises(RuntimeError, match="size mismatch for experts.w1"):
        off.load_state_dict(sd)


def test_padding_loads_no_expert():
    """token_mask: padding is routed nowhere, so an offloaded layer fetches no expert for it, and the real
    tokens' outputs are the resident layer's."""
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(16, 12, 8, 2).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] + [False] * 5])
    off = offload_experts(layer, cache_experts=8, device="cpu")
    with torch.no_grad():
        y = off(x, token_mask=mask)
        want = layer(x, token_mask=mask)
        needed = set(off.last_needed)
        real = set(layer.route(x[mask])[2].unique().tolist()) - {-1}
    torch.testing.assert_close(y, want)
    assert needed == real
    with pytest.raises(ValueError, match="moe_ext.offload: token_mask must be a bool tensor"):
        with torch.no_grad():
            off(x, token_mask=mask.long())
