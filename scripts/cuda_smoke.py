"""Every moe_ext op once on CUDA at small shapes, forward and backward, compared with the CPU kernels.

Small enough to run under compute-sanitizer (memcheck, racecheck) in seconds; it exists whatever the
test files are called. Exit 0 when everything matches, 1 otherwise, 2 without a GPU.
"""
import sys

import torch

import moe_ext
import moe_ext.functional as MF


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device visible")
        return 2
    torch.manual_seed(0)
    bad = []

    def same(name, a, b, tol):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) if b.numel() else 0.0
        status = "ok" if err <= tol else "MISMATCH"
        print(f"cuda_smoke {name:<32} rel err {err:.2e} {status}")
        if not err <= tol:
            bad.append(name)

    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        T, H, Fd, E, k = 37, 64, 48, 6, 2  # odd sizes on purpose
        x = torch.randn(T, H).to(dt)
        logits = torch.randn(T, E)
        w1 = (torch.randn(E, 2 * Fd, H) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, Fd) / Fd ** 0.5).to(dt)
        cpu = [t.clone().requires_grad_(True) for t in (x, w1, w2, logits)]
        gpu = [t.detach().cuda().requires_grad_(True) for t in (x, w1, w2, logits)]
        outs = []
        for xs, a, b, lg in (cpu, gpu):
            y = MF.fused_moe(xs, a, b, lg, k)
            y.backward(torch.ones_like(y))
            outs.append(y)
        same(f"fused_moe fwd {dt}", outs[1], outs[0], tol)
        for nm, c, g in zip(("dx", "dw1", "dw2", "dlogits"), cpu, gpu):
            same(f"fused_moe {nm} {dt}", g.grad, c.grad, 3 * tol)
        ids = torch.randint(-1, E, (T, k), dtype=torch.int32)  # with dropped slots
        wts = torch.rand(T, k)
        res = []
        for dev in ("cpu", "cuda"):
            xs, off, rm = MF.permute(x.to(dev), ids.to(dev), E)
            res.append((xs, off, rm, MF.unpermute(xs, rm, wts.to(dev))))
        for i, nm in enumerate(("x_sorted", "offsets", "row_map")):
            same(f"permute {nm} {dt}", res[1][i], res[0][i], 0.0)
        same(f"unpermute {dt}", res[1][3], res[0][3], tol)
        lg = torch.randn(T, 16)
        eb = torch.randn(16) * 0.1
        gs = [MF.topk_gating(lg.to(d), 4, score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=eb.to(d),
                             routed_scaling=2.5) for d in ("cpu", "cuda")]
        same("topk_gating ids (grouped sigmoid)", gs[1].expert_ids, gs[0].expert_ids, 0.0)
        same("topk_gating weights (grouped sigmoid)", gs[1].weights, gs[0].weights, 1e-5)
        for rows in (0, 5):  # a grouped GEMM with empty groups
            off = torch.tensor([0, 0, rows, rows, 2 * rows, 2 * rows, 2 * rows], dtype=torch.int64)
            a = torch.randn(2 * rows + 3, H).to(dt)
            res = [MF.grouped_gemm(a.to(d), w1.to(d), off.to(d), trans_b=True) for d in ("cpu", "cuda")]
            same(f"grouped_gemm rows={rows} {dt}", res[1], res[0], tol)
        h = torch.randn(T, 2 * 37).to(dt)  # odd F: the unvectorised activation kernels
        gr = torch.randn(T, 37).to(dt)
        for act in ("gelu", "gelu_tanh"):
            res = [(torch.ops.moe_ext.gated_activation(h.to(d), act),
                    torch.ops.moe_ext.gated_activation_backward(gr.to(d), h.to(d), act)) for d in ("cpu", "cuda")]
            same(f"gated_activation {act} F=37 {dt}", res[1][0], res[0][0], tol)
            same(f"gated_activation_backward {act} F=37 {dt}", res[1][1], res[0][1], 3 * tol)
    torch.cuda.synchronize()
    print(f"cuda_smoke: build {moe_ext.build_info()}")
    print("cuda_smoke: " + ("all ok" if not bad else f"{len(bad)} MISMATCHES: {bad}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
