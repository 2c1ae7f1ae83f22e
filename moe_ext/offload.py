"""Expert offloading for inference: all experts in host memory, at most N on the device.

    off = moe_ext.offload.offload_experts(layer, cache_experts=N)   # layer: a moe_ext.MoELayer
    with torch.no_grad():
        y = off(x)                    # equals layer(x)
    off.stats()                       # {"hits", "misses", "evictions", "bytes_copied", ...}

Every expert's w1/w2 (and b1/b2) lives in host memory (pinned when the device is a CUDA device) and
an LRU cache of N slots lives on the device as preallocated buffers cache_w1 [N, 2F|F, H],
cache_w2 [N, H, F] (cache_b1, cache_b2). Per batch:

1. route on the device (the layer's own routing: MoELayer.route), then count the slots per expert
   (expert_counts [E]) and read that count back to the host. This one small device-to-host read (E
   integers, it waits for the router) is inherent to offloading: the host must know which experts to
   copy. It is the only synchronisation of a forward (copy waits are device-side events).
2. order the needed experts resident first, then missing, and split them into rounds of at most N
   experts (N < needed experts: several rounds, never an error).
3. per round: pick slots for the missing experts (free slots, else the least recently used expert
   that this round does not need), start their host-to-device copies on a side stream and record an
   event; meanwhile compute the resident experts (global expert ids remapped to slot ids, ids of
   experts not in the group set to -1 so that their routing weights are masked; moe_ext.permute ->
   expert_ffn over the cache buffers -> unpermute); then the compute stream waits on the copy event
   and computes the newly loaded experts. The partial outputs are summed (in fp32, fp64 for fp64).

Without CUDA (or with device="cpu") the same code runs in a logic-only mode: the "host" store and the
cache are on the CPU and copies are synchronous, so CI tests the cache policy, the slot remapping and
the rounds; GPU runs measure the overlap.

Prefetch: prefetch(expert_ids) warms the cache ahead of need (for example with the experts the
previous layer's routing suggests, or the next layer's router run on the current hidden state); the
copies are asynchronous and the next forward waits on them only for the slots it uses.
stats()["prefetch_used"] / stats()["prefetch_issued"] measures how often the guess was right.

Inference only: forward runs under torch.no_grad(); its output has no autograd history. With grad
enabled and an input or parameter that requires grad it raises a RuntimeError instead of silently
returning a result without gradients.
"""
import collections
import time
from typing import Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from . import functional as MF
from .losses import expert_counts
from .modules import MoELayer, check_layer_input

__all__ = ["OffloadedMoE", "offload_experts", "bench_cache_sizes"]


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class OffloadedMoE(nn.Module):
    """A MoELayer whose routed experts live in host memory, with an LRU cache of N experts on the device.

    Build it with offload_experts(layer, cache_experts=N, device=None). The router and the shared
    experts are copied to the device (they are always needed); the routed experts' weights are copied
    to host memory (pinned on CUDA) and held as plain tensors, not parameters: choose the device at
    construction and do not .to() the module. The original layer is left untouched (drop it, or keep
    it on the CPU, to free its memory).

    Attributes: device, num_slots (= min(N, E)), cache_w1/cache_w2/cache_b1/cache_b2 (the device
    buffers), host_w1/host_w2/host_b1/host_b2 (the store), last_needed (the experts the last forward
    needed, a host list), last_stats/aux_loss (as MoELayer). Methods: forward, prefetch,
    resident_experts, num_resident, stats, reset_stats. state_dict holds the routed experts under
    MoELayer's names (experts.w1, experts.w2, experts.b1, experts.b2); load_state_dict copies them into
    the host store and empties the device cache.
    """

    # The routing is the layer's own code (it reads only the router and the routing attributes).
    route = MoELayer.route
    capacity = MoELayer.capacity
    _record = MoELayer._record
    _shared = MoELayer._shared

    def __init__(self, layer: MoELayer, cache_experts: int, device=None):
        super().__init__()
        if not isinstance(layer, MoELayer):
            raise TypeError(f"moe_ext.offload: expected a moe_ext.MoELayer, got {type(layer).__name__}")
        if int(cache_experts) < 1:
            raise ValueError(f"moe_ext.offload: cache_experts must be >= 1, got {cache_experts}")
        device = _default_device() if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.asynchronous = device.type == "cuda"
        for name in MoELayer.ROUTING_ATTRS:
            setattr(self, name, getattr(layer, name))
        self.training = False
        self.router = _frozen_copy(layer.router, device)
        self.shared_experts = _frozen_copy(layer.shared_experts, device) if layer.shared_experts is not None else None
        gate = getattr(layer, "shared_expert_gate", None)
        self.shared_expert_gate = _frozen_copy(gate, device) if gate is not None else None
        self.activation = layer.experts.activation
        E = layer.num_experts
        self.cache_experts = int(cache_experts)
        self.num_slots = min(self.cache_experts, E)

        pin = self.asynchronous

        def host(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            h = t.detach().to("cpu")
            if pin:
                h = h.pin_memory()
            return h.contiguous()

        def slots(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else torch.zeros((self.num_slots,) + tuple(t.shape[1:]), dtype=t.dtype,
                                                      device=device)

        ex = layer.experts
        self.host_w1, self.host_w2, self.host_b1, self.host_b2 = host(ex.w1), host(ex.w2), host(ex.b1), host(ex.b2)
        self.cache_w1, self.cache_w2, self.cache_b1, self.cache_b2 = slots(ex.w1), slots(ex.w2), slots(ex.b1), \
            slots(ex.b2)
        self.expert_bytes = sum(t[0].numel() * t.element_size()
                                for t in (self.host_w1, self.host_w2, self.host_b1, self.host_b2) if t is not None)
        self._copy_stream = torch.cuda.Stream(device=device) if self.asynchronous else None
        self._empty_cache()
        self._timings = []  # (start, end) CUDA event pairs around copy waits, read lazily in stats()
        self.last_needed: List[int] = []
        self.aux_loss: Tensor = torch.zeros(())
        self.last_stats: dict = {}
        self.reset_stats()
        # The routed experts are plain tensors, so state_dict would leave them out and load_state_dict
        # would report a match while keeping the old experts. They travel under MoELayer's names
        # (experts.w1, ...), so a MoELayer's state_dict loads here and this one loads into a MoELayer.
        self.register_state_dict_post_hook(_save_host_experts)
        self.register_load_state_dict_pre_hook(_load_host_experts)

    # ------------------------------------------------------------------ bookkeeping
    def _empty_cache(self) -> None:
        """No expert resident: every slot free (the slots' contents are stale, not cleared)."""
        self._lru: "collections.OrderedDict[int, int]" = collections.OrderedDict()  # expert -> slot, LRU first
        self._free: List[int] = list(range(self.num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._slot_event = {}  # slot -> CUDA event of a prefetch copy not yet waited on
        self._prefetched_unused = set()

    def reset_stats(self) -> None:
        """Zero the counters (the cache contents stay)."""
        self._timings = []
        self._stats = dict(hits=0, misses=0, evictions=0, bytes_copied=0, copy_wait_s=0.0, prefetch_issued=0,
                           prefetch_used=0, prefetch_wasted=0, rounds=0, forwards=0, host_reads=0,
                           max_resident=len(self._lru) if hasattr(self, "_lru") else 0)

    def stats(self) -> dict:
        """Counters since construction or reset_stats():

        hits / misses: needed experts found resident (prefetched ones included) / copied in;
        evictions; bytes_copied (host to device, prefetches included); copy_wait_s (CUDA: time the
        compute stream stalled waiting on copy events, measured with timing events, read here, which
        synchronises; logic-only mode: time spent in the synchronous copies); prefetch_issued (experts
        a prefetch copied in), prefetch_used (of those, used by a forward before eviction),
        prefetch_wasted (evicted unused), prefetch_accuracy = used / issued; rounds (expert groups of
        at most N computed; > forwards when a batch needs more than N experts); forwards; host_reads
        (device-to-host reads of the needed experts, one per forward); resident (experts on the device
        now), max_resident (high-water mark, never above N); cache_experts (N); slots (min(N, E));
        hit_rate = hits / (hits + misses).
        """
        self._fold_timings(block=True)
        s = dict(self._stats)
        s["resident"] = len(self._lru)
        s["cache_experts"] = self.cache_experts
        s["slots"] = self.num_slots
        s["prefetch_accuracy"] = s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else 0.0
        s["hit_rate"] = s["hits"] / (s["hits"] + s["misses"]) if s["hits"] + s["misses"] else 0.0
        return s

    def num_resident(self) -> int:
        """How many experts are on the device now (never more than N)."""
        return len(self._lru)

    def resident_experts(self) -> List[int]:
        """The experts on the device, least recently used first."""
        return list(self._lru)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, cache_experts={self.cache_experts}, "
                f"device={self.device}, asynchronous={self.asynchronous}")

    def _touch(self, e: int) -> None:
        self._lru.move_to_end(e)
        if e in self._prefetched_unused:
            self._prefetched_unused.discard(e)
            self._stats["prefetch_used"] += 1

    def _take_slot(self, protect) -> int:
        if self._free:
            return self._free.pop()
        for e in self._lru:  # least recently used first
            if e not in protect:
                slot = self._lru.pop(e)
                self._stats["evictions"] += 1
                self._slot_event.pop(slot, None)
                if e in self._prefetched_unused:
                    self._prefetched_unused.discard(e)
                    self._stats["prefetch_wasted"] += 1
                return slot
        raise AssertionError("moe_ext.offload: no evictable slot (a round needs more experts than the cache holds)")

    def _load(self, experts: List[int], protect) -> Optional["torch.cuda.Event"]:
        """Copy `experts` into slots (evicting LRU experts outside `protect`); returns the copy event (CUDA)."""
        if not experts:
            return None
        placed = [(e, self._take_slot(protect)) for e in experts]
        pairs = [(self.host_w1, self.cache_w1), (self.host_w2, self.cache_w2), (self.host_b1, self.cache_b1),
                 (self.host_b2, self.cache_b2)]
        pairs = [p for p in pairs if p[0] is not None]
        event = None
        if self.asynchronous:
            cs = self._copy_stream
            # A slot being overwritten may still be read by work already queued on the compute stream.
            cs.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(cs):
                for e, slot in placed:
                    for src, dst in pairs:
                        dst[slot].copy_(src[e], non_blocking=True)
                event = torch.cuda.Event()
                event.record(cs)
        else:
            t0 = time.perf_counter()
            for e, slot in placed:
                for src, dst in pairs:
                    dst[slot].copy_(src[e])
            self._stats["copy_wait_s"] += time.perf_counter() - t0
        for e, slot in placed:
            self._lru[e] = slot
        self._stats["bytes_copied"] += len(placed) * self.expert_bytes
        self._stats["max_resident"] = max(self._stats["max_resident"], len(self._lru))
        assert len(self._lru) <= self.num_slots
        return event

    def _fold_timings(self, block: bool) -> None:
        """Add the measured copy waits to copy_wait_s (all of them when block, else the finished ones)."""
        if block and self._timings:
            self._timings[-1][1].synchronize()
        keep = []
        for start, end in self._timings:
            if block or end.query():
                self._stats["copy_wait_s"] += start.elapsed_time(end) / 1e3
            else:
                keep.append((start, end))
        self._timings = keep

    def _wait(self, event) -> None:
        if event is None:
            return
        cur = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(cur)
        cur.wait_event(event)
        end.record(cur)
        self._timings.append((start, end))
        if len(self._timings) > 256:  # long serving runs: fold the finished ones without synchronising
            self._fold_timings(block=False)

    # ------------------------------------------------------------------ public API
    def prefetch(self, expert_ids: Union[Tensor, Iterable[int]]) -> int:
        """Warm the cache with `expert_ids` (a tensor or iterable of global ids; -1 and repeats are ignored).

        Resident experts become most recently used; missing ones are copied in asynchronously (CUDA),
        evicting the least recently used others. At most N experts are taken (the first N distinct
        ids). A device tensor is read back to the host (one small synchronisation): pass host ids
        where you have them. Returns the number of experts copied (counted in prefetch_issued).
        """
        if isinstance(expert_ids, Tensor):
            expert_ids = expert_ids.reshape(-1).tolist()
        want, seen = [], set()
        for e in expert_ids:
            e = int(e)
            if e < 0 or e in seen:
                continue
            if e >= self.num_experts:
                raise ValueError(f"moe_ext.offload.prefetch: expert id {e} out of range [0, {self.num_experts})")
            seen.add(e)
            want.append(e)
        want = want[:self.num_slots]
        for e in want:
            if e in self._lru:
                self._lru.move_to_end(e)
        missing = [e for e in want if e not in self._lru]
        event = self._load(missing, protect=set(want))
        for e in missing:
            self._prefetched_unused.add(e)
            if event is not None:
                self._slot_event[self._lru[e]] = event
        self._stats["prefetch_issued"] += len(missing)
        return len(missing)

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """As MoELayer.forward; padding (token_mask False) needs no expert, so it loads none."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("moe_ext.offload: OffloadedMoE is inference-only (its experts are host tensors "
                               "without gradients); call it under torch.no_grad() or torch.inference_mode() "
                               "with inputs and parameters that do not require grad")
        with torch.no_grad():
            return self._forward(x, check_layer_input(x, token_mask, self.router.weight, "moe_ext.offload"))

    def _group(self, x: Tensor, ids: Tensor, weights: Tensor, experts: List[int], counts: List[int],
               acc_dtype: torch.dtype) -> Tensor:
        """sum over the slots routed to `experts` of weight * expert(x): the other slots get id -1."""
        E = self.num_experts
        lut = [-1] * (E + 1)
        for e in experts:
            lut[e] = self._lru[e]
        lut = torch.tensor(lut, dtype=torch.int32).to(self.device, non_blocking=True)
        slot_ids = lut[torch.where(ids >= 0, ids.long(), E)]
        rows = sum(counts[e] for e in experts)
        x_sorted, offsets, row_map = MF.permute(x, slot_ids, self.num_slots, rows)
        y_sorted = MF.expert_ffn(x_sorted, offsets, self.cache_w1, self.cache_w2, self.activation, self.cache_b1,
                                 self.cache_b2)
        return MF.unpermute(y_sorted.to(acc_dtype), row_map, weights)

    def _forward(self, x: Tensor, token_mask: Optional[Tensor]) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E = self.num_experts
        r = self.route(x, token_mask)
        weights, ids = r.weights, r.expert_ids
        counts_dev = expert_counts(ids, E)  # slots per expert, on the device
        counts = counts_dev.tolist()  # the one device-to-host read of a forward (see the module docstring)
        self._stats["host_reads"] += 1
        self._stats["forwards"] += 1
        needed = [e for e in range(E) if counts[e] > 0]
        self.last_needed = needed
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
        order = [e for e in needed if e in self._lru] + [e for e in needed if e not in self._lru]
        for start in range(0, len(order), self.num_slots):
            group = order[start:start + self.num_slots]
            self._stats["rounds"] += 1
            hits = [e for e in group if e in self._lru]
            missing = [e for e in group if e not in self._lru]
            self._stats["hits"] += len(hits)
            self._stats["misses"] += len(missing)
            for e in hits:
                self._touch(e)
            event = self._load(missing, protect=set(group))  # async on CUDA: overlaps the hits' compute
            if hits:
                for ev in {id(v): v for v in (self._slot_event.pop(self._lru[e], None) for e in hits)
                           if v is not None}.values():
                    self._wait(ev)  # prefetch copies still in flight
                y += self._group(x, ids, weights, hits, counts, acc_dtype)
            if missing:
                self._wait(event)
                y += self._group(x, ids, weights, missing, counts, acc_dtype)
        y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self._shared(x)
        offsets = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.cumsum(counts_dev, 0)
        self._record(r, offsets, shape)
        return y.reshape(shape)


_EXPERT_TENSORS = ("w1", "w2", "b1", "b2")


def _save_host_experts(module: "OffloadedMoE", state_dict, prefix, local_metadata) -> None:
    for name in _EXPERT_TENSORS:
        t = getattr(module, "host_" + name)
        if t is not None:
            state_dict[prefix + "experts." + name] = t


def _load_host_experts(module: "OffloadedMoE", state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """Copies experts.* into the host store (checking shapes) and empties the device cache, whose
    slots hold the old experts."""
    if module._copy_stream is not None:
        module._copy_stream.synchronize()  # no copy may still read the host store being overwritten
    for name in _EXPERT_TENSORS:
        key, dst = prefix + "experts." + name, getattr(module, "host_" + name)
        if dst is None:
            continue
        if key not in state_dict:
            missing_keys.append(key)
            continue
        src = state_dict.pop(key)
        if tuple(src.shape) != tuple(dst.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(src.shape)} from "
                              f"checkpoint, the shape in current model is {tuple(dst.shape)}.")
            continue
        with torch.no_grad():
            dst.copy_(src)
    module._empty_cache()


def _frozen_copy(module: nn.Module, device: torch.device) -> nn.Module:
    import copy
    m = copy.deepcopy(module).to(device)
    m.requires_grad_(False)
    m.eval()
    return m


def offload_experts(layer: MoELayer, cache_experts: int, device=None) -> OffloadedMoE:
    """Return an OffloadedMoE serving `layer` with every expert in host memory and at most
    `cache_experts` (N) of them on `device` (default: the current CUDA device, else the CPU in the
    logic-only mode). Outputs equal layer(x) for any N >= 1 (N < experts a batch needs: several
    rounds). Inference only. See the module docstring and docs/offload.md.
    """
    return OffloadedMoE(layer, cache_experts, device)


# ---------------------------------------------------------------------- benchmark
MIXTRAL = dict(num_experts=8, top_k=2, d_model=4096, d_ff=14336, activation="silu")


def bench_cache_sizes(cache_sizes: Optional[List[int]] = None, *, device=None, scale: Optional[int] = None,
                      tokens: int = 8, batches: int = 8, repeats: int = 2, dtype: Optional[torch.dtype] = None,
                      num_experts: int = MIXTRAL["num_experts"], top_k: int = MIXTRAL["top_k"],
                      out_png: Optional[str] = None, seed: int = 0) -> dict:
    """Latency of one offloaded Mixtral-shaped MoE layer against the cache size N.

    Mixtral-8x7B experts: E = 8, k = 2, H = 4096, F = 14336, SwiGLU. H and F are divided by `scale`
    (default 1 on CUDA, 32 on the CPU: H = 128, F = 448 there, so the CPU numbers are a scaled-down
    logic check, not Mixtral timings). Each of `batches` batches holds `tokens` random tokens (decode-like
    when small); the batches are run once to warm up, then `repeats` times, timed. The resident layer
    (all experts on the device) is the baseline. Returns {"device", "shapes", "scaled", "resident_ms",
    "results": [{"cache_experts", "latency_ms", "hit_rate", "misses", "bytes_copied", "copy_wait_s",
    "rounds"}, ...]}; with out_png, also writes a plot (matplotlib, Agg backend) there.
    """
    device = _default_device() if device is None else torch.device(device)
    on_cuda = device.type == "cuda"
    scale = scale if scale is not None else (1 if on_cuda else 32)
    dtype = dtype if dtype is not None else (torch.bfloat16 if on_cuda else torch.float32)
    H, F = MIXTRAL["d_model"] // scale, MIXTRAL["d_ff"] // scale
    cache_sizes = list(cache_sizes) if cache_sizes is not None else list(range(1, num_experts + 1))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = MoELayer(H, F, num_experts, top_k, activation=MIXTRAL["activation"], dtype=dtype).eval()
    xs = [torch.randn(tokens, H, generator=g).to(device=device, dtype=dtype) for _ in range(batches)]

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        with torch.no_grad():
            for x in xs:  # warm-up pass
                fn(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                for x in xs:
                    fn(x)
            sync()
        return (time.perf_counter() - t0) * 1e3 / (repeats * len(xs))

    resident = layer.to(device)
    resident_ms = timed(resident)
    host_layer = resident.to("cpu")  # the offloaded module copies the experts to host memory
    results = []
    for n in cache_sizes:
        off = offload_experts(host_layer, n, device)
        with torch.no_grad():
            for x in xs:
                off(x)
        off.reset_stats()
        ms = timed(off)  # includes one more warm-up pass; the stats below cover both passes
        s = off.stats()
        results.append(dict(cache_experts=n, latency_ms=ms, hit_rate=s["hit_rate"], misses=s["misses"],
                            bytes_copied=s["bytes_copied"], copy_wait_s=s["copy_wait_s"], rounds=s["rounds"]))
        del off
    out = dict(device=str(device), shapes=dict(num_experts=num_experts, top_k=top_k, d_model=H, d_ff=F,
                                               tokens=tokens, dtype=str(dtype)),
               scaled=scale != 1, resident_ms=resident_ms, results=results)
    if out_png is not None:
        _plot(out, out_png)
    return out


def _plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sh = res["shapes"]
    ns = [r["cache_experts"] for r in res["results"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["latency_ms"] for r in res["results"]], "o-", label="offloaded")
    ax.axhline(res["resident_ms"], color="gray", linestyle="--", label="all experts resident")
    ax.set_xlabel("cache size N (experts on the device)")
    ax.set_ylabel("latency per batch (ms)")
    title = (f"E={sh['num_experts']} k={sh['top_k']} H={sh['d_model']} F={sh['d_ff']} T={sh['tokens']} "
             f"{sh['dtype'].replace('torch.', '')} on {res['device']}")
    ax.set_title(title + (" (scaled down)" if res["scaled"] else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description="moe_ext expert offloading: latency against cache size")
    p.add_argument("--device", default=None)
    p.add_argument("--scale", type=int, default=None)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--png", default=None)
    a = p.parse_args()
    print(json.dumps(bench_cache_sizes(device=a.device, scale=a.scale, tokens=a.tokens, out_png=a.png), indent=1))
