"""The CUDA ops of moe_ext run on the CPU through the CUDA emulation (emu.h, emu_build.py): the "emu"
back end of the `kern` fixture (tests/kernel_backends.py), CPU tensors in and out.

Each function mirrors its torch glue in csrc/cuda/*_cuda.cpp (the same outputs, workspace sizes and
launcher calls) with CPU tensors standing in for device memory; `misaligned` puts its data buffers
one element past a 16-byte boundary. Every buffer a kernel sees is a
`Guarded` allocation:
  - outputs and workspaces start filled with a poison byte, as cudaMalloc'd memory holds garbage,
    so a kernel that leaves an element unwritten (or relies on zeroed memory) shows in the results;
  - guard bytes on both sides are checked after each launch (an out-of-bounds write);
  - each buffer ends (up to 15 bytes of alignment slack) at an inaccessible page, so a read or write
    past its end faults at the access.
Inputs are not validated here: tests call the CPU op first, which shares its checks with CUDA.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402

emulated = True
SEEDS = (1, 2)  # the scheduling orders schedules() runs
PAGE = mmap.PAGESIZE
GUARD = 64
POISON = 0xA5
GUARD_BYTE = 0xCD
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SCORE = {"softmax": 0, "sigmoid": 1}
ORDER = {"softmax_topk": 0, "topk_softmax": 1}
ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swigluoai": 3}

_lib = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class EmuError(RuntimeError):
    """A launch the emulation refused or a kernel that broke a rule (see emu.h)."""


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        path = emu_build.build()
        _lib = ctypes.CDLL(str(path))
        _lib.emu_last_message.restype = ctypes.c_char_p
        for name in ("emu_topk_gating_workspace_bytes", "emu_topk_gating_backward_workspace_bytes",
                     "emu_permute_workspace_bytes", "emu_unpermute_backward_workspace_bytes"):
            getattr(_lib, name).restype = ctypes.c_size_t
    return _lib


def set_seed(seed: int) -> None:
    """The scheduling order of the emulated threads (a race shows as results that change with it)."""
    lib().emu_set_seed(ctypes.c_uint64(seed))


def schedules():
    """Each scheduling order in turn: a missing barrier or a race changes the results between them."""
    try:
        for seed in SEEDS:
            set_seed(seed)
            yield seed
    finally:
        set_seed(SEEDS[0])


def poison():
    """Nothing to do: every emulated output starts as poison (the GPU back end poisons its allocator)."""


class Guarded:
    """`nbytes` of memory for a kernel, 16-byte aligned plus `misalign` bytes, between guard bytes
    and just before an inaccessible page."""

    def __init__(self, nbytes: int, misalign: int = 0):
        self.nbytes = nbytes
        body = GUARD + misalign + nbytes + GUARD
        pages = (body + PAGE - 1) // PAGE + 1
        self.map = mmap.mmap(-1, (pages + 1) * PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        fence = self.base + pages * PAGE  # the inaccessible page
        if _libc.mprotect(fence, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        # the data ends at the fence, less the slack that keeps it 16-byte aligned (+ misalign)
        start = (fence - nbytes - misalign) // 16 * 16 + misalign
        self.offset = start - self.base
        self.raw = torch.frombuffer(self.map, dtype=torch.uint8, count=pages * PAGE)
        self.raw.fill_(GUARD_BYTE)
        self.data_bytes = self.raw[self.offset:self.offset + nbytes]
        self.data_bytes.fill_(POISON)

    def guards_intact(self) -> bool:
        lo = self.raw[max(0, self.offset - GUARD):self.offset]
        hi = self.raw[self.offset + self.nbytes:]
        return bool((lo == GUARD_BYTE).all()) and bool((hi == GUARD_BYTE).all())


class Launch:
    """The buffers of one op call: allocate, call the launcher, check the guards, copy results out."""

    def __init__(self):
        self.buffers: list[tuple[str, Guarded]] = []

    def empty(self, name, shape, dtype, misaligned=False) -> torch.Tensor:
        n = math.prod(shape)
        elem = torch.empty((), dtype=dtype).element_size()
        g = Guarded(n * elem, elem if misaligned else 0)
        self.buffers.append((name, g))
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return g.data_bytes.view(dtype).view(shape)

    def input(self, name, t: torch.Tensor, misaligned=False) -> torch.Tensor:
        out = self.empty(name, tuple(t.shape), t.dtype, misaligned)
        out.copy_(t)
        return out

    def workspace(self, nbytes) -> int:
        return self.empty("workspace", (max(nbytes, 1),), torch.uint8).data_ptr()

    def call(self, fn, *args) -> None:
        lib().emu_clear_error()
        err = fn(*args)
        message = lib().emu_last_message().decode()
        if err != 0:
            raise EmuError(f"{fn.__name__}: error {err}: {message}")
        bad = [name for name, g in self.buffers if not g.guards_intact()]
        if bad:
            raise EmuError(f"{fn.__name__}: out-of-bounds write next to {bad}")


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else None)


def _i(v):
    return ctypes.c_int64(int(v))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_gating(logits, k, score_func="softmax", order="softmax_topk", renormalize=True, expert_bias=None,
                num_groups=1, topk_groups=1, routed_scaling=1.0, group_score="top2_sum"):
    T, E = logits.shape
    acc = _acc(logits.dtype)
    L = Launch()
    lg = L.input("logits", logits.contiguous())
    weights = L.empty("weights", (T, k), acc)
    ids = L.empty("ids", (T, k), torch.int32)
    lse = L.empty("lse", (T,), acc)
    if T == 0:
        return weights.clone(), ids.clone(), torch.zeros(E, dtype=torch.int32), torch.zeros(E, dtype=acc), lse.clone()
    tpe = L.empty("tokens_per_expert", (E,), torch.int32)
    ss = L.empty("score_sum", (E,), acc)
    bias = L.input("bias", expert_bias.to(acc).contiguous()) if expert_bias is not None else None
    dt = DTYPE_CODE[logits.dtype]
    common = (_i(T), E, k, SCORE[score_func], ORDER[order], int(renormalize), num_groups, topk_groups,
              ctypes.c_double(routed_scaling), 1 if group_score == "max" else 2)
    ws = L.workspace(lib().emu_topk_gating_workspace_bytes(*common, int(bias is not None), dt))
    L.call(lib().emu_topk_gating, *common, dt, _p(lg), _p(bias), _p(weights), _p(ids), _p(lse), _p(tpe), _p(ss),
           ctypes.c_void_p(ws))
    return weights.clone(), ids.clone(), tpe.clone(), ss.clone(), lse.clone()


def topk_gating_backward(grad_weights, grad_score_sum, grad_lse, logits, expert_ids, score_func, order, renormalize,
                         routed_scaling):
    T, E = logits.shape
    k = expert_ids.shape[1]
    acc = _acc(logits.dtype)
    L = Launch()
    lg = L.input("logits", logits.contiguous())
    grad_logits = L.empty("grad_logits", (T, E), logits.dtype)
    if T == 0:
        return grad_logits.clone()
    ids = L.input("ids", expert_ids.contiguous())
    gw = L.input("grad_weights", grad_weights.to(acc).contiguous())
    gss = L.input("grad_score_sum", grad_score_sum.to(acc).contiguous()) if grad_score_sum is not None else None
    glse = L.input("grad_lse", grad_lse.to(acc).contiguous()) if grad_lse is not None else None
    dt = DTYPE_CODE[logits.dtype]
    common = (_i(T), E, k, SCORE[score_func], ORDER[order], int(renormalize), ctypes.c_double(routed_scaling))
    ws = L.workspace(lib().emu_topk_gating_backward_workspace_bytes(*common, dt))
    L.call(lib().emu_topk_gating_backward, *common, dt, _p(lg), _p(ids), _p(gw), _p(gss), _p(glse), _p(grad_logits),
           ctypes.c_void_p(ws))
    return grad_logits.clone()


def permute(x, expert_ids, num_experts, max_rows=-1, misaligned=False):
    T, H = x.shape
    k = expert_ids.shape[1]
    slots = T * k
    R = slots if max_rows < 0 else max_rows
    L = Launch()
    xs = L.input("x", x.contiguous(), misaligned)
    ids = L.input("expert_ids", expert_ids.contiguous())
    offsets = L.empty("expert_offsets", (num_experts + 1,), torch.int64)
    row_map = L.empty("row_map", (T, k), torch.int64)
    x_sorted = L.empty("x_sorted", (R, H), x.dtype, misaligned)
    if slots == 0:
        return torch.zeros(R, H, dtype=x.dtype), torch.zeros(num_experts + 1, dtype=torch.int64), row_map.clone()
    ws = L.workspace(lib().emu_permute_workspace_bytes(_i(slots), _i(num_experts)))
    L.call(lib().emu_permute, _p(xs), ctypes.c_size_t(x.element_size()), _i(T), _i(H), _p(ids),
           int(expert_ids.dtype == torch.int32), _i(k), _i(num_experts), _i(R), _p(x_sorted), _p(offsets),
           _p(row_map), ctypes.c_void_p(ws))
    return x_sorted.clone(), offsets.clone(), row_map.clone()


def unpermute(y_sorted, row_map, weights=None, misaligned=False):
    T, k = row_map.shape
    R, H = y_sorted.shape
    L = Launch()
    ys = L.input("y_sorted", y_sorted.contiguous(), misaligned)
    rm = L.input("row_map", row_map.contiguous())
    y = L.empty("y", (T, H), y_sorted.dtype, misaligned)
    if T == 0 or H == 0:
        return y.clone()
    w = L.input("weights", weights.to(_acc(y_sorted.dtype)).contiguous()) if weights is not None else None
    L.call(lib().emu_unpermute, DTYPE_CODE[y_sorted.dtype], _p(ys), _p(rm), _p(w), _p(y), _i(T), _i(k), _i(H), _i(R))
    return y.clone()


def unpermute_backward(grad_y, y_sorted, row_map, weights):
    T, k = row_map.shape
    R, H = y_sorted.shape
    acc = _acc(y_sorted.dtype)
    L = Launch()
    gy = L.input("grad_y", grad_y.to(y_sorted.dtype).contiguous())
    ys = L.input("y_sorted", y_sorted.contiguous())
    rm = L.input("row_map", row_map.contiguous())
    grad_ys = L.empty("grad_y_sorted", (R, H), y_sorted.dtype)
    if T * k == 0:
        return (torch.zeros(R, H, dtype=y_sorted.dtype),
                torch.empty(T, k, dtype=weights.dtype) if weights is not None else torch.empty(0, dtype=y_sorted.dtype))
    w = L.input("weights", weights.to(acc).contiguous()) if weights is not None else None
    gw = L.empty("grad_weights", (T, k), acc) if weights is not None else None
    ws = L.workspace(lib().emu_unpermute_backward_workspace_bytes(_i(R)))
    L.call(lib().emu_unpermute_backward, DTYPE_CODE[y_sorted.dtype], _p(gy), _p(ys), _p(rm), _p(w), _p(grad_ys),
           _p(gw), ctypes.c_void_p(ws), _i(T), _i(k), _i(H), _i(R))
    return grad_ys.clone(), (gw.to(weights.dtype) if gw is not None else torch.empty(0, dtype=y_sorted.dtype))


def gated_activation(h, activation="silu", misaligned=False):
    M, F2 = h.shape
    F = F2 // 2
    L = Launch()
    hh = L.input("h", h.contiguous(), misaligned)
    out = L.empty("out", (M, F), h.dtype, misaligned)
    if M == 0 or F == 0:
        return out.clone()
    L.call(lib().emu_gated_activation, DTYPE_CODE[h.dtype], ACT[activation], _p(hh), _p(out), _i(M), _i(F))
    return out.clone()


def gated_activation_backward(grad, h, activation="silu"):
    M, F2 = h.shape
    F = F2 // 2
    L = Launch()
    g = L.input("grad", grad.contiguous())
    hh = L.input("h", h.contiguous())
    gh = L.empty("grad_h", (M, F2), h.dtype)
    if M == 0 or F == 0:
        return gh.clone()
    L.call(lib().emu_gated_activation_backward, DTYPE_CODE[h.dtype], ACT[activation], _p(g), _p(hh), _p(gh), _i(M),
           _i(F))
    return gh.clone()


def capacity_reroute(expert_ids, keys, capacity):
    T, k = expert_ids.shape
    E = keys.shape[1]
    L = Launch()
    ids = L.input("expert_ids", expert_ids.contiguous())
    if T == 0 or k == 0:
        return ids.clone()
    ks = L.input("keys", keys.to(torch.float32).contiguous())
    load = L.empty("load", (E,), torch.int32)
    L.call(lib().emu_capacity_reroute, _p(ids), int(expert_ids.dtype == torch.int32), _p(ks), _i(T), _i(k), _i(E),
           _i(capacity), _p(load))
    return ids.clone()


FORM = {"nn": 0, "nt": 1, "wgrad": 2}


def grouped_gemm(a, b, expert_offsets, trans_b=False, bias=None, misaligned=False):
    """grouped_gemm_cuda's path when CUTLASS does not take the call: prefill, then the CUDA-core kernel."""
    M, K = a.shape
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    L = Launch()
    c = L.empty("c", (M, N), a.dtype, misaligned)
    if M == 0 or N == 0:
        return c.clone()
    aa = L.input("a", a.contiguous(), misaligned)
    bb = L.input("b", b.contiguous(), misaligned)
    offs = L.input("expert_offsets", expert_offsets.contiguous())
    bias_c = L.input("bias", bias.contiguous()) if bias is not None else None
    prefill = (_p(c), _p(bias_c), _p(offs), _i(E), _i(M), _i(N), a.element_size())
    if K == 0 or E == 0:
        if bias_c is not None and E > 0:
            L.call(lib().emu_grouped_gemm_prefill, *prefill)
            return c.clone()
        return torch.zeros(M, N, dtype=a.dtype)
    L.call(lib().emu_grouped_gemm_prefill, *prefill)
    L.call(lib().emu_grouped_gemm_simt, FORM["nt" if trans_b else "nn"], _p(aa), _p(bb), _p(c), _p(offs), _i(M), _i(K),
           _i(N), _i(E), int(bias is not None), DTYPE_CODE[a.dtype])
    return c.clone()


def grouped_gemm_wgrad(x, y, expert_offsets, misaligned=False):
    """grouped_gemm_wgrad_cuda's path when CUTLASS does not take the call: the CUDA-core kernel alone."""
    M, P = x.shape
    Q = y.shape[1]
    E = expert_offsets.shape[0] - 1
    L = Launch()
    out = L.empty("out", (E, P, Q), x.dtype, misaligned)
    if out.numel() == 0:
        return out.clone()
    if M == 0:
        return torch.zeros(E, P, Q, dtype=x.dtype)
    xx = L.input("x", x.contiguous(), misaligned)
    yy = L.input("y", y.contiguous(), misaligned)
    offs = L.input("expert_offsets", expert_offsets.contiguous())
    L.call(lib().emu_grouped_gemm_simt, FORM["wgrad"], _p(xx), _p(yy), _p(out), _p(offs), _i(M), _i(P), _i(Q), _i(E),
           0, DTYPE_CODE[x.dtype])
    return out.clone()


def grouped_gemm_zero_empty_experts(out, expert_offsets, rows):
    """The epilogue-side fix after a CUTLASS wgrad: out [E, P, Q] (any values) with the experts that own no
    rows (offsets clamped to [0, rows]) zeroed, the rest left as they were."""
    E = out.shape[0]
    L = Launch()
    o = L.input("out", out.contiguous())
    offs = L.input("expert_offsets", expert_offsets.contiguous())
    L.call(lib().emu_grouped_gemm_zero_empty_experts, _p(o), _p(offs), _i(E), _i(rows), _i(out[0].numel() if E else 0),
           out.element_size())
    return o.clone()
