"""The benchmark suites: for one Case, build the inputs, the implementations (moe_ext and its
baselines), their correctness checks against moe_ext.reference, and the FLOP / byte counts.

Each builder returns a Built: impls {name: fn(i)} (i = input set, rotated), graphable (names that
may be timed as CUDA-graph replays), checks {name: () -> (ok, err, note)}, flops, bytes.
"""
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import moe_ext.functional as MF
from moe_ext import reference as R

from . import baselines as B
from .shapes import Case, dtype_for, ref_dtype_for, router_logits, router_weight_and_input, routing_stats, \
    sets_for, tolerance
from .timing import NO_RANGES, Ranges


@dataclass
class Built:
    impls: Dict[str, Callable] = field(default_factory=dict)
    checks: Dict[str, Callable] = field(default_factory=dict)
    graphable: set = field(default_factory=set)
    skipped: Dict[str, str] = field(default_factory=dict)   # baseline -> why it was not run
    flops: float = 0.0
    bytes: float = 0.0
    n_sets: int = 1
    info: dict = field(default_factory=dict)
    profile_fn: Optional[Callable] = None   # the moe_ext call to profile (with stage ranges if any)
    saved_bytes: Dict[str, int] = field(default_factory=dict)  # fwd+bwd: activations kept for the backward


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def saved_for_backward(fn: Callable, exclude) -> tuple:
    """(fn(), bytes of the distinct storages autograd saved while fn ran), leaving out the storages of
    `exclude` (the inputs and parameters, which exist anyway): the activation memory a training step holds
    between forward and backward. Exact and device-independent, unlike an allocator's peak."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def poison(device: str, nbytes: int):
    """Fill a freed block of the caching allocator with NaN bytes, so that an output written there
    and left unwritten reads as NaN (CUDA only; the CPU allocator gives no such reuse)."""
    if device == "cuda" and nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0xFF)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.double() - ref.double().to(out.device)).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 1.0
    err = d / max(scale, 1e-30)
    return float("inf") if err != err else err


def _seed(case: Case) -> int:
    return zlib.crc32(f"{case.suite}/{case.model}/{case.T}/{case.routing}/{case.pass_}".encode())


def _gen(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(case))


def _randn(shape, device: str, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random normal numbers made on the device itself (big expert weights: no host work, no copy)."""
    return torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(scale)


def _ids(case: Case, gen) -> torch.Tensor:
    s = case.shape
    return torch.topk(router_logits(case.T, s["E"], case.routing, gen), s["k"], dim=-1).indices.to(torch.int32)


# --- gating -------------------------------------------------------------------------------------

def build_gating(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    s, gen = case.shape, _gen(case)
    T, E, k, g = case.T, s["E"], s["k"], s["gating"]
    ds = g.get("score_func") == "sigmoid"
    L0 = router_logits(T, E, case.routing, gen)
    eb = (torch.randn(E, generator=gen) * 0.1).to(device) if ds else None
    n = sets_for(device, _nbytes(L0))
    Ls = [L0.to(device)] + [router_logits(T, E, case.routing, gen).to(device) for _ in range(n - 1)]
    b = Built(n_sets=n, graphable={"moe_ext", "torch"})

    def moe(i):
        with ranges("gating"):
            return MF.topk_gating(Ls[i], k, expert_bias=eb, **g)

    b.impls["moe_ext"] = moe
    b.impls["torch"] = lambda i: B.torch_gating(Ls[i], k, expert_bias=eb, **g)
    rd = ref_dtype_for(device)
    rw, rids, rtpe, *_ = R.topk_gating(Ls[0].to(rd), k, expert_bias=None if eb is None else eb.to(rd), **g)

    def check(fn, full):
        def run():
            poison(device, T * k * 8)
            out = fn(0)
            w, ids = out[0], out[1]
            bad = int((ids.long() != rids).any(-1).sum())
            err = rel_err(w, rw)
            ok = bad == 0 and err <= tolerance(torch.float32)
            if full and ok:
                ok = torch.equal(out[2].long().cpu(), rtpe.long().cpu())
            return ok, err, (f"{bad} tokens chose other experts" if bad else "")
        return run

    b.checks = {"moe_ext": check(moe, True), "torch": check(b.impls["torch"], False)}
    b.bytes = T * E * 4 + T * k * 8 + T * 4 + 2 * E * 4
    b.info = dict(routing_stats(rids, E), logits="fp32")
    b.profile_fn = moe
    return b


# --- permute / unpermute ------------------------------------------------------------------------

def build_permute(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    s, gen = case.shape, _gen(case)
    T, H, E, k = case.T, s["H"], s["E"], s["k"]
    dt = dtype_for(device)
    ids = _ids(case, gen)
    x0 = torch.randn(T, H, generator=gen).to(dt)
    n = sets_for(device, _nbytes(x0))
    Xs = [x0.to(device)] + [torch.randn(T, H, device=device).to(dt) for _ in range(n - 1)]
    ids_d = ids.to(device)
    b = Built(n_sets=n, graphable={"moe_ext", "torch"})

    def moe(i):
        with ranges("permute"):
            return MF.permute(Xs[i], ids_d, E)

    b.impls = {"moe_ext": moe, "torch": lambda i: B.torch_permute(Xs[i], ids_d, E)}
    ref = R.permute(x0, ids, E)

    def check(fn):
        def run():
            poison(device, T * k * H * x0.element_size())
            out = fn(0)
            same = [torch.equal(o.cpu(), r.cpu().to(o.dtype)) for o, r in zip(out, ref)]
            return all(same), 0.0 if all(same) else float("inf"), \
                "" if all(same) else "differs in " + ",".join(nm for nm, ok in zip(("x_sorted", "offsets", "row_map"), same) if not ok)
        return run

    b.checks = {nm: check(fn) for nm, fn in b.impls.items()}
    S = T * k
    b.bytes = T * H * x0.element_size() + T * k * 4 + S * H * x0.element_size() + S * 8 + (E + 1) * 8
    b.info = routing_stats(ids, E)
    b.profile_fn = moe
    return b


def build_unpermute(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    s, gen = case.shape, _gen(case)
    T, H, E, k = case.T, s["H"], s["E"], s["k"]
    dt, S = dtype_for(device), case.T * s["k"]
    ids = _ids(case, gen)
    _, _, row_map = R.permute(torch.zeros(T, 1), ids, E)
    w = torch.softmax(torch.randn(T, k, generator=gen), -1)
    y0 = torch.randn(S, H, generator=gen).to(dt)
    n = sets_for(device, _nbytes(y0))
    Ys = [y0.to(device)] + [torch.randn(S, H, device=device).to(dt) for _ in range(n - 1)]
    rm, wd = row_map.to(device), w.to(device)
    b = Built(n_sets=n, graphable={"moe_ext", "torch"})

    def moe(i):
        with ranges("unpermute"):
            return MF.unpermute(Ys[i], rm, wd)

    b.impls = {"moe_ext": moe, "torch": lambda i: B.torch_unpermute(Ys[i], rm, wd)}
    ref = R.unpermute(y0.double(), row_map, w.double())

    def check(fn):
        def run():
            poison(device, T * H * y0.element_size())
            err = rel_err(fn(0), ref)
            return err <= tolerance(dt), err, ""
        return run

    b.checks = {nm: check(fn) for nm, fn in b.impls.items()}
    b.bytes = S * H * y0.element_size() + S * 12 + T * H * y0.element_size()
    b.info = routing_stats(ids, E)
    b.profile_fn = moe
    return b


def build_activation(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    """The gated activation between the two GEMMs on the S = T * k permuted rows: act(gate) * up over
    [S, 2F] (and its backward for fwd+bwd), moe_ext's one-pass kernel against torch's composition."""
    s, gen = case.shape, _gen(case)
    act = s["act"] if MF.ACTIVATIONS[s["act"]][1] else "silu"
    S, Fd, dt = case.T * s["k"], s["F"], dtype_for(device)
    bwd = case.pass_ == "fwd+bwd"
    h0 = torch.randn(S, 2 * Fd, generator=gen).to(dt)
    n = sets_for(device, _nbytes(h0))
    Hs = [h0.to(device)] + [torch.randn(S, 2 * Fd, device=device).to(dt) for _ in range(n - 1)]
    Hs = [h.requires_grad_(bwd) for h in Hs]
    gy = torch.randn(S, Fd, generator=gen).to(dt).to(device) if bwd else None
    b = Built(n_sets=n, graphable={"moe_ext", "torch"})

    def run(fn):
        def call(i):
            y = fn(Hs[i])
            return (y,) + (torch.autograd.grad(y, Hs[i], gy) if bwd else ())
        return call

    def moe(h):
        with ranges("activation"):
            return MF.apply_activation(h, act)

    b.impls = {"moe_ext": run(moe), "torch": run(lambda h: B._act(h, act))}
    hr = h0.double().requires_grad_(bwd)
    yr = B._act(hr, act)
    ref = (yr.detach(),) + ((torch.autograd.grad(yr, hr, gy.cpu().double())[0],) if bwd else ())

    def check(fn):
        def run_check():
            poison(device, S * Fd * h0.element_size())
            out = fn(0)
            errs = [rel_err(o, r) for o, r in zip(out, ref)]
            return all(e <= tolerance(dt, grad=j > 0) for j, e in enumerate(errs)), max(errs), act
        return run_check

    b.checks = {nm: check(fn) for nm, fn in b.impls.items()}
    esz = h0.element_size()
    b.bytes = S * 3 * Fd * esz + (S * 5 * Fd * esz if bwd else 0)  # read h, write out (+ read grad, h; write grad_h)
    b.profile_fn = b.impls["moe_ext"]
    return b


# --- grouped GEMM -------------------------------------------------------------------------------

def build_grouped_gemm(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    s, gen = case.shape, _gen(case)
    T, H, Fd, E, k = case.T, s["H"], s["F"], s["E"], s["k"]
    gated = MF.ACTIVATIONS[s["act"]][1]
    K, N = (H, (2 if gated else 1) * Fd) if case.pass_ == "w1" else (Fd, H)
    dt, S = dtype_for(device), T * k
    ids = _ids(case, gen)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    off = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    gd = torch.Generator(device=device).manual_seed(_seed(case))
    esz = torch.empty((), dtype=dt).element_size()
    n = sets_for(device, (S * K + E * N * K) * esz, cap=16)
    As = [_randn((S, K), device, dt, gd) for _ in range(n)]
    Bs = [_randn((E, N, K), device, dt, gd, K ** -0.5) for _ in range(n)]
    a0 = As[0]
    off_d, off_h = off.to(device), off.tolist()
    bd = _randn((N, K), device, dt, gd, K ** -0.5)
    stage = f"grouped_gemm_{case.pass_}"
    b = Built(n_sets=n, graphable={"moe_ext", "torch_loop", "grouped_mm", "dense"} if T <= 128 else set())

    def moe(i):
        with ranges(stage):
            return MF.grouped_gemm(As[i], Bs[i], off_d, trans_b=True)

    def loop(i):  # a cuBLAS call per expert, offsets known on the host (tgale96/grouped_gemm's default)
        a, w = As[i], Bs[i]
        out = a.new_empty(S, N)
        for e in range(E):
            if off_h[e + 1] > off_h[e]:
                torch.mm(a[off_h[e]:off_h[e + 1]], w[e].t(), out=out[off_h[e]:off_h[e + 1]])
        return out

    b.impls = {"moe_ext": moe, "torch_loop": loop}
    why = B.grouped_mm_available(device, dt)
    if why is None:
        b.impls["grouped_mm"] = lambda i: B.grouped_mm_gemm(As[i], Bs[i], off_d)
    else:
        b.skipped["grouped_mm"] = why
    b.impls["dense"] = lambda i: torch.mm(As[i], bd.t())
    rd = ref_dtype_for(device)
    ref = R.grouped_gemm(As[0].to(rd), Bs[0].to(rd), off_d, trans_b=True)

    def check(fn):
        def run():
            poison(device, S * N * a0.element_size())
            err = rel_err(fn(0), ref)
            return err <= tolerance(dt), err, ""
        return run

    b.checks = {nm: check(fn) for nm, fn in b.impls.items() if nm != "dense"}
    hit = int((counts > 0).sum())
    b.flops = 2.0 * S * K * N
    b.bytes = (S * K + hit * N * K + S * N) * a0.element_size()
    b.info = dict(routing_stats(ids, E), M=S, N=N, K=K)
    b.profile_fn = moe
    return b


# --- the whole layer ----------------------------------------------------------------------------

def ref_layer(x, rw, w1, w2, b1, b2, k, act, gating, expert_bias, logits_routed, dtype):
    """Reference MoE layer in `dtype`: moe_ext.reference.topk_gating picks the experts from the
    logits the implementation routes on; weights, experts and sums in `dtype` (differentiable). Expert
    weights are converted one expert at a time, so a forward reference never copies all of them."""
    g = dict(gating)
    x, rw = x.to(dtype), rw.to(dtype)
    _, ids, *_ = R.topk_gating(logits_routed.to(dtype), k,
                               expert_bias=None if expert_bias is None else expert_bias.to(dtype), **g)
    logits = F.linear(x, rw)
    score = torch.sigmoid(logits) if g.get("score_func") == "sigmoid" else torch.softmax(logits, -1)
    w = score.gather(1, ids)
    if g.get("renormalize", True):
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * g.get("routed_scaling", 1.0)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, j = (ids == e).nonzero(as_tuple=True)
        y = R.expert_forward(x[tok], w1[e].to(dtype), w2[e].to(dtype), act, None if b1 is None else b1[e].to(dtype),
                             None if b2 is None else b2[e].to(dtype))
        out = out.index_add(0, tok, w[tok, j].unsqueeze(-1) * y)
    return out, ids


def build_layer(case: Case, device: str, ranges: Ranges = NO_RANGES) -> Built:
    s, gen = case.shape, _gen(case)
    T, H, Fd, E, k, act, g = case.T, s["H"], s["F"], s["E"], s["k"], s["act"], s["gating"]
    gated = MF.ACTIVATIONS[act][1]
    F1, dt, S = (2 if gated else 1) * Fd, dtype_for(device), T * k
    bwd = case.pass_ == "fwd+bwd"
    gd = torch.Generator(device=device).manual_seed(_seed(case))
    esz = torch.empty((), dtype=dt).element_size()
    x0, rw0 = router_weight_and_input(T, H, E, case.routing, gen)
    names = ("x", "rw", "w1", "w2", "b1", "b2")
    n = sets_for(device, (T * H + E * H + E * F1 * H + E * H * Fd + (E * (F1 + H) if s["bias"] else 0)) * esz, cap=8)

    def make_set(first: bool):
        x = x0.clone() if first else torch.randn(T, H, generator=gen)
        x[:, 0] = 1.0  # the constant column that carries the routing skew
        t = dict(x=x.to(device, dt), rw=rw0.to(device, dt),  # same router: same routing distribution
                 w1=_randn((E, F1, H), device, dt, gd, H ** -0.5), w2=_randn((E, H, Fd), device, dt, gd, Fd ** -0.5),
                 b1=_randn((E, F1), device, dt, gd, 0.1) if s["bias"] else None,
                 b2=_randn((E, H), device, dt, gd, 0.1) if s["bias"] else None)
        return {nm: None if v is None else torch.nn.Parameter(v, requires_grad=bwd) for nm, v in t.items()}

    sets = [make_set(i == 0) for i in range(n)]
    eb = (torch.randn(E, generator=gen) * 0.1).to(device) if g.get("score_func") == "sigmoid" else None
    gy = torch.randn(T, H, device=device).to(dt) if bwd else None
    b = Built(n_sets=n)
    grad_names = [nm for nm in names if sets[0][nm] is not None]

    def wrap(layer):
        def fn(i):
            st = sets[i]
            y = layer(st)
            if not bwd:
                return (y,)
            return (y,) + torch.autograd.grad(y, [st[nm] for nm in grad_names], gy)
        return fn

    kw = dict(k=k, activation=act, gating=g, expert_bias=eb)
    b.impls["moe_ext"] = wrap(lambda st: B.moe_ext_layer(st["x"], st["rw"], st["w1"], st["w2"], b1=st["b1"],
                                                         b2=st["b2"], **kw))
    b.profile_fn = wrap(lambda st: B.staged_moe(st["x"], st["rw"], st["w1"], st["w2"], b1=st["b1"], b2=st["b2"],
                                                ranges=Ranges(nvtx=ranges.nvtx, record=True), **kw))
    if ranges.nvtx:  # the timed moe_ext call carries the NVTX stage ranges (--nsys)
        b.impls["moe_ext"] = wrap(lambda st: B.staged_moe(st["x"], st["rw"], st["w1"], st["w2"], b1=st["b1"],
                                                          b2=st["b2"], ranges=ranges, **kw))
    if bwd:  # recompute=True: the same forward, a backward that recomputes x_sorted and act(h)
        b.impls["moe_ext_recompute"] = wrap(lambda st: B.moe_ext_layer(
            st["x"], st["rw"], st["w1"], st["w2"], b1=st["b1"], b2=st["b2"], recompute=True, **kw))
    b.impls["naive"] = wrap(lambda st: R.naive_moe(st["x"], st["rw"], st["w1"], st["w2"], k, act, st["b1"], st["b2"]))
    semantics = {"naive": {}}
    why = B.grouped_mm_available(device, dt)
    if why is None:
        b.impls["grouped_mm"] = wrap(lambda st: B.grouped_mm_layer(st["x"], st["rw"], st["w1"], st["w2"], b1=st["b1"],
                                                                   b2=st["b2"], **kw))
    else:
        b.skipped["grouped_mm"] = why
    if act == "silu" and not s["bias"] and not g:
        for impl in ("eager", "grouped_mm"):
            run, why = B.hf_mixtral_block(H, Fd, E, k, sets[0]["rw"], sets[0]["w1"], sets[0]["w2"], impl)
            if run is None:
                b.skipped[f"hf_{impl}"] = why
                continue
            blocks = {id(sets[0]["x"]): run}
            blocks.update({id(st["x"]): B.hf_mixtral_block(H, Fd, E, k, st["rw"], st["w1"], st["w2"], impl)[0]
                           for st in sets[1:]})
            b.impls[f"hf_{impl}"] = wrap((lambda bl: lambda st: bl[id(st["x"])](st["x"]))(blocks))
            semantics[f"hf_{impl}"] = {}
    else:
        b.skipped["hf_mixtral"] = "transformers' Mixtral block: gated SiLU, no bias, softmax routing only"
    dx = torch.randn(S, H, device=device).to(dt).requires_grad_(bwd)
    dw1 = (torch.randn(F1, H, device=device) / H ** 0.5).to(dt).requires_grad_(bwd)
    dw2 = (torch.randn(H, Fd, device=device) / Fd ** 0.5).to(dt).requires_grad_(bwd)

    def dense(i):  # the experts' FLOPs as two dense GEMMs over all S rows: the ceiling
        h = B._act(F.linear(dx, dw1), act)
        y = F.linear(h, dw2)
        return (y,) if not bwd else (y,) + torch.autograd.grad(y, [dx, dw1, dw2], y)
    b.impls["dense"] = dense
    b.graphable = {"moe_ext", "grouped_mm", "dense"} if (T <= 128 and not bwd and not ranges.active) else set()

    # References, in fp32 (CUDA) / fp64 (CPU), routed on the very logits each implementation sees.
    rd = ref_dtype_for(device)
    st0 = sets[0]
    with torch.no_grad():
        logits_lp = F.linear(st0["x"], st0["rw"])
    refs = {}

    def ref_for(gating):
        key = tuple(sorted(gating.items()))
        if key not in refs:
            with torch.enable_grad():
                # fwd+bwd: leaves in the reference dtype (grads at full precision); fwd: the
                # implementation's tensors, converted per expert inside ref_layer.
                leaves = {nm: (st0[nm].detach().to(rd).requires_grad_(True) if bwd else st0[nm].detach())
                          for nm in grad_names}
                get = lambda nm: leaves.get(nm)  # noqa: E731
                y, ids = ref_layer(get("x"), get("rw"), get("w1"), get("w2"), get("b1"), get("b2"), k, act, gating,
                                   eb if gating.get("score_func") == "sigmoid" else None, logits_lp, rd)
                grads = torch.autograd.grad(y, [leaves[nm] for nm in grad_names], gy.to(rd)) if bwd else ()
            refs[key] = ([y.detach()] + [t.detach() for t in grads], ids)
        return refs[key]

    def check(name):
        def run():
            ref, _ = ref_for(semantics.get(name, g))
            poison(device, T * H * x0.element_size() * (1 + bwd))
            with torch.enable_grad() if bwd else torch.no_grad():
                if bwd:
                    out, b.saved_bytes[name] = saved_for_backward(lambda: b.impls[name](0), list(st0.values()))
                else:
                    out = b.impls[name](0)
            tol = tolerance(dt)
            row = (out[0].double() - ref[0].double()).abs().amax(-1) / ref[0].double().abs().max().clamp_min(1e-30)
            bad = int((~(row <= tol)).sum())  # NaN counts as bad
            allowed = 0 if name.startswith("moe_ext") else max(1, T // 100)  # baselines: torch.topk ties may pick otherwise
            errs = [rel_err(out[0], ref[0])] + [rel_err(o, r) for o, r in zip(out[1:], ref[1:])]
            ok = bad <= allowed and (bad > 0 or all(e <= tolerance(dt, grad=True) for e in errs[1:]))
            note = (f"{bad}/{T} rows off (routing ties)" if bad else "") + \
                   (" softmax routing" if name in semantics and g else "")
            return ok, max(errs), note.strip()
        return run

    b.checks = {nm: check(nm) for nm in b.impls if nm != "dense"}
    _, rids = ref_for(g)
    hit = int(rids.unique().numel())
    b.flops = (2.0 * S * H * F1 + 2.0 * S * Fd * H + 2.0 * T * H * E) * (3 if bwd else 1)
    b.bytes = ((hit * (F1 * H + H * Fd) + E * H + 2 * T * H) * esz) * (3 if bwd else 1)
    b.info = dict(routing_stats(rids, E))
    return b


BUILDERS = {"gating": build_gating, "permute": build_permute, "unpermute": build_unpermute,
            "activation": build_activation, "grouped_gemm": build_grouped_gemm, "layer": build_layer}
