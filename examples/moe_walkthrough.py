# %% [markdown]
# # Mixture of Experts on a laptop CPU: a walkthrough with `moe_ext`
#
# The chapter's experiments for the reader, runnable on a CPU in minutes:
#
# 1. **A simple MoE layer from scratch** (the textbook loop), checked against `moe_ext.MoELayer`.
# 2. **A tiny MoE transformer** trained on four synthetic "languages" (disjoint token ranges, each with
#    its own grammar), so that we can see which experts take which kind of token.
# 3. **Load balancing**: expert load with and without the load-balancing loss.
# 4. **Specialisation**: a language x expert heatmap.
# 5. **Router z-loss and jitter**: their effect on the router logits.
# 6. **Capacity factor**: dropped tokens, loss and throughput.
# 7. **The capacity-compute trade-off**: parameters, FLOPs per token and measured time of a dense FFN
#    and of MoE layers with the same active size.
#
# Every number below is measured by this run (seeded, so reruns give the same losses and routing;
# timings vary with the machine). Run it as a script:
#
# ```bash
# python examples/moe_walkthrough.py --quick --out walkthrough_out   # ~1-2 minutes on 2 CPU cores
# python examples/moe_walkthrough.py --out walkthrough_out           # the full run, ~10 minutes
# ```
#
# or as the notebook `examples/moe_walkthrough.ipynb` (generated from this file by
# `scripts/make_notebook.py`), where the arguments come from the environment variable
# `MOE_WALKTHROUGH_ARGS` (e.g. `MOE_WALKTHROUGH_ARGS="--quick --out /tmp/walk"`).
# Figures (PNG) and `metrics.json` are written to `--out`.

# %%
import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

IN_NOTEBOOK = "ipykernel" in sys.modules
import matplotlib  # noqa: E402

if not IN_NOTEBOOK:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import moe_ext  # noqa: E402
from moe_ext.reference import naive_moe  # noqa: E402

PRESETS = {
    # steps: training steps per run; batch x seq tokens per step; layers/d_model/d_ff: the tiny transformer
    # (d_ff is each expert's hidden size; the dense baseline gets top_k * d_ff); bench_*: the compute study.
    "full": dict(steps=500, batch=32, seq=64, layers=2, d_model=128, d_ff=128, lr=5e-3, eval_seqs=256,
                 log_every=10, reps=10, bench_tokens=4096, bench_d_model=256, bench_d_ff=512,
                 bench_experts=[4, 8, 16, 32, 64]),
    "quick": dict(steps=300, batch=16, seq=32, layers=1, d_model=64, d_ff=128, lr=1e-2, eval_seqs=128,
                  log_every=10, reps=5, bench_tokens=2048, bench_d_model=128, bench_d_ff=256,
                  bench_experts=[4, 8, 16, 32]),
    "smoke": dict(steps=12, batch=8, seq=16, layers=1, d_model=64, d_ff=64, lr=3e-3, eval_seqs=32,
                  log_every=4, reps=1, bench_tokens=256, bench_d_model=64, bench_d_ff=64,
                  bench_experts=[4, 8]),
}

parser = argparse.ArgumentParser(description="The chapter's MoE experiments on a CPU.")
parser.add_argument("--quick", action="store_true", help="a short run (~1-2 minutes on 2 cores)")
parser.add_argument("--smoke", action="store_true", help="a seconds-long run that only exercises the code")
parser.add_argument("--out", default="walkthrough_out", help="directory for the figures and metrics.json")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the preset's)")
parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's)")
parser.add_argument("--aux", type=float, default=0.1, help="load-balancing loss coefficient")
parser.add_argument("--z", type=float, default=1e-2, help="router z-loss coefficient")
parser.add_argument("--jitter", type=float, default=0.1, help="router jitter eps")
parser.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). The matrices here are tiny, and on a busy "
                         "machine extra threads mostly wait on each other: 1 is fastest and steadiest")
argv = shlex.split(os.environ.get("MOE_WALKTHROUGH_ARGS", "")) if IN_NOTEBOOK else sys.argv[1:]
args = parser.parse_args(argv)
MODE = "smoke" if args.smoke else "quick" if args.quick else "full"
cfg = argparse.Namespace(**PRESETS[MODE], mode=MODE, seed=args.seed, num_experts=8, top_k=2)
cfg.steps = args.steps or cfg.steps
cfg.lr = args.lr or cfg.lr
OUT = args.out
if args.threads > 0:
    torch.set_num_threads(args.threads)
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(cfg.seed)
metrics = {"config": vars(cfg).copy(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "figures": [], "seconds": {}}
T_START = time.perf_counter()
print(f"mode={MODE} out={OUT} torch={torch.__version__} threads={torch.get_num_threads()}")


def save(fig, name):
    """Save a figure under OUT (and show it inline in a notebook)."""
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, name), dpi=110)
    metrics["figures"].append(name)
    if IN_NOTEBOOK:
        plt.show()
    plt.close(fig)


def best_ms(fn, reps):
    """Best-of-reps wall time of fn() in milliseconds, after one warm-up call (the machine may be busy:
    the minimum is the least disturbed measurement)."""
    fn()
    best = float("inf")
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# %% [markdown]
# ## 1. A simple MoE layer from scratch
#
# The textbook layer: a linear router scores the experts, each token keeps its top-k experts and a
# softmax over those k scores weights their outputs; a loop over the experts runs each expert on the
# tokens that chose it. Each expert is a gated (SwiGLU) FFN: `w_down(silu(w_gate x) * w_up x)`.

# %%
class TextbookMoE(nn.Module):
    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.gate = nn.ModuleList(nn.Linear(d_model, d_ff, bias=False) for _ in range(num_experts))
        self.up = nn.ModuleList(nn.Linear(d_model, d_ff, bias=False) for _ in range(num_experts))
        self.down = nn.ModuleList(nn.Linear(d_ff, d_model, bias=False) for _ in range(num_experts))

    def forward(self, x):  # x [T, d_model]
        top_logits, top_ids = self.router(x).topk(self.top_k, dim=-1)  # each token's k best experts
        gates = top_logits.softmax(dim=-1)  # [T, k]: weights of the chosen experts, summing to 1
        out = torch.zeros_like(x)
        for e in range(len(self.gate)):
            token, slot = (top_ids == e).nonzero(as_tuple=True)  # the tokens that chose expert e
            if token.numel():
                xe = x[token]
                ye = self.down[e](F.silu(self.gate[e](xe)) * self.up[e](xe))
                out.index_add_(0, token, gates[token, slot, None] * ye)
        return out

    @torch.no_grad()
    def load_from(self, layer: moe_ext.MoELayer):
        """Copy a MoELayer's weights: router.weight [E, H], experts.w1 [E, 2F, H] (gate rows, then up
        rows), experts.w2 [E, H, F]."""
        F_ = layer.experts.w2.shape[-1]
        self.router.weight.copy_(layer.router.weight)
        for e in range(layer.num_experts):
            self.gate[e].weight.copy_(layer.experts.w1[e, :F_])
            self.up[e].weight.copy_(layer.experts.w1[e, F_:])
            self.down[e].weight.copy_(layer.experts.w2[e])
        return self


# %% [markdown]
# The same weights in `moe_ext.MoELayer` (fused gating, permute, grouped GEMM, unpermute) and in the
# library's own textbook reference `moe_ext.reference.naive_moe` must give the same output.
# (MoELayer's default routing, softmax over all experts then top-k renormalised, equals a softmax
# over the k chosen logits.)

# %%
t0 = time.perf_counter()
H, Fh, E, K = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
layer = moe_ext.MoELayer(H, Fh, E, K)
scratch = TextbookMoE(H, Fh, E, K).load_from(layer)
x = torch.randn(cfg.bench_tokens, H)
with torch.no_grad():
    y_fused, y_scratch = layer(x), scratch(x)
    y_naive = naive_moe(x, layer.router.weight, layer.experts.w1, layer.experts.w2, K)
    ms_fused = best_ms(lambda: layer(x), cfg.reps)
    ms_scratch = best_ms(lambda: scratch(x), cfg.reps)
diff_scratch = (y_fused - y_scratch).abs().max().item()
diff_naive = (y_fused - y_naive).abs().max().item()
assert torch.allclose(y_fused, y_scratch, atol=1e-5, rtol=1e-4), diff_scratch
assert torch.allclose(y_fused, y_naive, atol=1e-5, rtol=1e-4), diff_naive
metrics["from_scratch"] = {"tokens": cfg.bench_tokens, "max_abs_diff_textbook_vs_moelayer": diff_scratch,
                           "max_abs_diff_naive_moe_vs_moelayer": diff_naive,
                           "ms_textbook": ms_scratch, "ms_moelayer": ms_fused}
print(f"max |MoELayer - from scratch| = {diff_scratch:.2e}, |MoELayer - naive_moe| = {diff_naive:.2e}; "
      f"forward of {cfg.bench_tokens} tokens: textbook {ms_scratch:.2f} ms, MoELayer {ms_fused:.2f} ms")
metrics["seconds"]["from_scratch"] = time.perf_counter() - t0

# %% [markdown]
# ## 2. Data: four synthetic languages
#
# Each language owns 16 token ids (disjoint ranges, vocabulary 64) and has its own grammar; every
# sequence is in one language:
#
# - **counting**: `a, a+s, a+2s, ...` (mod 16), with a per-sequence stride `s` in 1..3;
# - **repeating**: a random pattern of period 2, 3 or 4, repeated;
# - **markov**: a fixed sparse bigram grammar (each token has two successors, p = 0.75 / 0.25);
# - **zipf**: independent draws from a Zipf distribution (nothing to learn beyond unigram frequencies).

# %%
LANGS = ["counting", "repeating", "markov", "zipf"]
V_LANG = 16
VOCAB = V_LANG * len(LANGS)
_g = torch.Generator().manual_seed(1234)  # the grammar itself is fixed, whatever --seed says
MARKOV_NEXT = torch.stack([torch.randperm(V_LANG, generator=_g)[:2] for _ in range(V_LANG)])  # [16, 2]
ZIPF_P = 1.0 / torch.arange(1, V_LANG + 1, dtype=torch.float64)
ZIPF_P = ZIPF_P[torch.randperm(V_LANG, generator=_g)]


def make_batch(n, seq, gen, langs=None):
    """n sequences of seq tokens: (tokens [n, seq] int64, language [n] int64)."""
    lang = torch.randint(len(LANGS), (n,), generator=gen) if langs is None else langs
    pos = torch.arange(seq)
    # counting
    start = torch.randint(V_LANG, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    counting = (start + stride * pos) % V_LANG
    # repeating
    pattern = torch.randint(V_LANG, (n, 4), generator=gen)
    period = torch.randint(2, 5, (n, 1), generator=gen)
    repeating = torch.gather(pattern, 1, pos % period)
    # markov
    markov = torch.empty(n, seq, dtype=torch.int64)
    markov[:, 0] = torch.randint(V_LANG, (n,), generator=gen)
    second = torch.rand(n, seq, generator=gen) < 0.25
    for t in range(1, seq):
        markov[:, t] = MARKOV_NEXT[markov[:, t - 1], second[:, t].long()]
    # zipf
    zipf = torch.multinomial(ZIPF_P, n * seq, replacement=True, generator=gen).view(n, seq)
    tokens = torch.stack([counting, repeating, markov, zipf], 1)[torch.arange(n), lang]
    return tokens + lang[:, None] * V_LANG, lang


gen_eval = torch.Generator().manual_seed(cfg.seed + 1000)
EVAL_TOKENS, EVAL_LANG = make_batch(cfg.eval_seqs, cfg.seq, gen_eval,
                                    langs=torch.arange(cfg.eval_seqs) % len(LANGS))  # balanced
for i in range(len(LANGS)):
    print(f"{LANGS[i]:>10}: {EVAL_TOKENS[i, :16].tolist()}")


# %% [markdown]
# ## 3. A tiny MoE transformer
#
# Pre-norm blocks: causal self-attention, then `moe_ext.MoELayer` as the FFN (8 experts, top-2,
# SwiGLU experts). `ffn="dense"` swaps in a dense SwiGLU FFN of hidden size `top_k * d_ff`: the same
# active parameters per token as the MoE layer, for the capacity-compute comparison.

# %%
class DenseFFN(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, ffn):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ffn = ffn
        self.ffn_in = None  # the last FFN input [B*S, d_model], kept for the routing analysis

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        h = self.ln2(x)
        self.ffn_in = h.detach().reshape(-1, D)
        return x + self.ffn(h)


class TinyLM(nn.Module):
    def __init__(self, ffn="moe", **moe_kw):
        super().__init__()
        D = cfg.d_model
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(cfg.seq, D)
        make = (lambda: moe_ext.MoELayer(D, cfg.d_ff, cfg.num_experts, cfg.top_k, **moe_kw)) if ffn == "moe" \
            else (lambda: DenseFFN(D, cfg.top_k * cfg.d_ff))
        self.blocks = nn.ModuleList(Block(D, 4, make()) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def moe_layers(self):
        return [b.ffn for b in self.blocks if isinstance(b.ffn, moe_ext.MoELayer)]

    def aux_loss(self):
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros(()))

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def lm_loss(model, tokens, reduction="mean"):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction=reduction)


# %% [markdown]
# Training: AdamW, the same seed (initial weights) and the same data order for every run; only the
# router options differ. Along the way we log the loss, the share of the busiest expert (fraction of
# the routed slots it receives; 1/8 = 0.125 is perfectly balanced) and the router's mean logsumexp.

# %%
@torch.no_grad()
def routing(model, tokens=None, lang=None):
    """Route the eval set through a trained model (eval mode: no jitter, dropless): per MoE layer the
    router logits [T, E], expert ids [T, k] and each token's language [T]."""
    tokens = EVAL_TOKENS if tokens is None else tokens
    lang = EVAL_LANG if lang is None else lang
    model.eval()
    model(tokens[:, :-1])
    out = []
    for b in model.blocks:
        if isinstance(b.ffn, moe_ext.MoELayer):
            logits, _, ids, *_ = b.ffn.route(b.ffn_in)
            out.append(dict(logits=logits, ids=ids.long(),
                            lang=lang[:, None].expand(-1, tokens.shape[1] - 1).reshape(-1)))
    model.train()
    return out


def load_fraction(ids):
    counts = torch.bincount(ids[ids >= 0], minlength=cfg.num_experts).double()
    return counts / counts.sum()


def lang_expert(r):
    """[languages, experts]: the fraction of each language's routed slots that go to each expert."""
    m = torch.zeros(len(LANGS), cfg.num_experts, dtype=torch.float64)
    m.index_put_((r["lang"][:, None].expand_as(r["ids"]).reshape(-1), r["ids"].reshape(-1)),
                 torch.ones(r["ids"].numel(), dtype=torch.float64), accumulate=True)
    return m


def mutual_information_bits(joint):
    p = joint / joint.sum()
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / outer[nz]).log2()).sum())


RUNS = {}


def train(name, ffn="moe", **moe_kw):
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = TinyLM(ffn, **moe_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hist = {"step": [], "loss": [], "max_load": [], "lse": []}
    for step in range(1, cfg.steps + 1):
        tokens, _ = make_batch(cfg.batch, cfg.seq, gen)
        ce = lm_loss(model, tokens)
        loss = ce + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            hist["step"].append(step)
            hist["loss"].append(ce.item())
            moes = model.moe_layers()
            if moes:
                with torch.no_grad():
                    tpe = [m.last_stats["tokens_per_expert"].double() for m in moes]
                    hist["max_load"].append(max(float(t.max() / t.sum()) for t in tpe))
                    hist["lse"].append(sum(float(torch.logsumexp(b.ffn.router(b.ffn_in), -1).mean())
                                           for b in model.blocks) / len(moes))
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        per_tok = lm_loss(model, EVAL_TOKENS, reduction="none").view(cfg.eval_seqs, -1).mean(1)
    model.train()
    res = {"model": model, "hist": hist, "train_seconds": seconds,
           "train_tokens_per_second": cfg.steps * cfg.batch * (cfg.seq - 1) / seconds,
           "eval_loss": float(per_tok.mean()),
           "eval_loss_per_language": {L: float(per_tok[EVAL_LANG == i].mean()) for i, L in enumerate(LANGS)},
           "params": sum(p.numel() for p in model.parameters())}
    if ffn == "moe":
        rs = routing(model)
        loads = [load_fraction(r["ids"]) for r in rs]
        res.update(routing=rs, expert_load_fraction=[ld.tolist() for ld in loads],
                   max_expert_load_fraction=max(float(ld.max()) for ld in loads),
                   specialisation_mi_bits=[mutual_information_bits(lang_expert(r)) for r in rs],
                   mean_max_logit=float(torch.stack([r["logits"].max(-1).values.mean() for r in rs]).mean()),
                   mean_lse=float(torch.stack([torch.logsumexp(r["logits"], -1).mean() for r in rs]).mean()),
                   mean_abs_logit=float(torch.stack([r["logits"].abs().mean() for r in rs]).mean()),
                   mean_logit_std=float(torch.stack([r["logits"].std(-1).mean() for r in rs]).mean()))
    RUNS[name] = res
    print(f"{name:>10}: eval loss {res['eval_loss']:.3f}, {seconds:.1f} s"
          + (f", busiest expert {res['max_expert_load_fraction']:.3f} of slots" if ffn == "moe" else ""))
    return res


AUX = args.aux        # load-balancing loss coefficient (Switch: 1e-2; larger here for a short run)
Z = args.z            # router z-loss coefficient (ST-MoE: 1e-3; larger here to see it in a short run)
JITTER = args.jitter  # multiplicative router-input jitter, uniform in [1 - eps, 1 + eps] (Switch: 1e-2)
t0 = time.perf_counter()
train("no_aux")
train("aux", aux_loss_coef=AUX)
metrics["seconds"]["train_balance"] = time.perf_counter() - t0

# %% [markdown]
# ## 4. Load balancing: expert load with and without the auxiliary loss
#
# Without the load-balancing loss nothing stops the router from sending most tokens to a few experts
# (the chapter's unbalanced-routing picture); with it, the load is pushed towards uniform.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
width = 0.4
for j, (name, label) in enumerate([("no_aux", "no load-balancing loss"), ("aux", f"load-balancing loss {AUX:g}")]):
    ld = RUNS[name]["expert_load_fraction"][0]
    axes[0].bar(torch.arange(cfg.num_experts) + (j - 0.5) * width, ld, width, label=label)
    axes[1].plot(RUNS[name]["hist"]["step"], RUNS[name]["hist"]["max_load"], label=label)
for ax in axes:
    ax.axhline(1 / cfg.num_experts, color="k", ls="--", lw=1, label="uniform (1/8)")
axes[0].set(xlabel="expert", ylabel="fraction of routed slots", title="Expert load (eval set, layer 0)")
axes[1].set(xlabel="training step", ylabel="busiest expert's fraction", title="Busiest expert during training")
axes[0].legend(fontsize=8)
save(fig, "expert_load.png")
metrics["max_expert_load_fraction"] = {"aux": RUNS["aux"]["max_expert_load_fraction"],
                                       "no_aux": RUNS["no_aux"]["max_expert_load_fraction"]}
print("busiest expert's share of routed slots:", metrics["max_expert_load_fraction"])

# %% [markdown]
# ## 5. Specialisation: which experts take which language?
#
# Each row is a language; each cell is the fraction of that language's routed slots (k = 2 per token)
# sent to an expert. The mutual information between language and expert (in bits; at most
# log2(4) = 2) summarises how specialised the routing is.

# %%
n_layers = len(RUNS["aux"]["routing"])
fig, axes = plt.subplots(n_layers, 2, figsize=(10, 2.6 * n_layers + 0.6), squeeze=False)
for j, name in enumerate(["no_aux", "aux"]):
    for li, r in enumerate(RUNS[name]["routing"]):
        m = lang_expert(r)
        m = m / m.sum(1, keepdim=True)
        ax = axes[li, j]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(0.5, float(m.max())))
        for a in range(m.shape[0]):
            for e in range(m.shape[1]):
                ax.text(e, a, f"{m[a, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if m[a, e] < 0.3 else "k")
        ax.set_yticks(range(len(LANGS)), LANGS)
        ax.set_xticks(range(cfg.num_experts))
        ax.set(xlabel="expert", title=f"{name}, layer {li}: MI = {RUNS[name]['specialisation_mi_bits'][li]:.2f} bits")
        fig.colorbar(im, ax=ax, fraction=0.03)
save(fig, "specialisation.png")
metrics["specialisation_mi_bits"] = {n: RUNS[n]["specialisation_mi_bits"] for n in ["no_aux", "aux"]}
print("mutual information language/expert (bits):", metrics["specialisation_mi_bits"])

# %% [markdown]
# ## 6. Router z-loss and jitter
#
# The z-loss (ST-MoE) penalises the square of each token's router logsumexp, to keep the router's
# exponentials in a safe range; jitter (Switch) multiplies the router input by noise in training.
# Three runs with the load-balancing loss: with neither, with the z-loss, with jitter; then the trained
# routers' logits on the eval set. A softmax does not change when all of a token's logits shift by
# the same amount, so a router can lower its logsumexp by shifting them all down: next to the
# logsumexp and the largest logit we also plot the spread of a token's logits (their standard
# deviation across experts), which a shift leaves alone and which sets how sharp the routing is.

# %%
t0 = time.perf_counter()
train("aux_z", aux_loss_coef=AUX, z_loss_coef=Z)
train("aux_jitter", aux_loss_coef=AUX, jitter_eps=JITTER)
metrics["seconds"]["train_z_jitter"] = time.perf_counter() - t0
variants = [("aux", "neither"), ("aux_z", f"z-loss {Z:g}"), ("aux_jitter", f"jitter {JITTER:g}")]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
for name, label in variants:
    lg = torch.cat([r["logits"] for r in RUNS[name]["routing"]])
    for ax, v in zip(axes, [torch.logsumexp(lg, -1), lg.max(-1).values, lg.std(-1)]):
        ax.hist(v.numpy(), bins=40, histtype="step", lw=1.5, label=label)
    axes[3].plot(RUNS[name]["hist"]["step"], RUNS[name]["hist"]["lse"], label=label)
axes[0].set(xlabel="logsumexp of a token's logits", ylabel="tokens", title="Router logsumexp (eval set)")
axes[1].set(xlabel="largest logit of a token", ylabel="tokens", title="Max router logit (eval set)")
axes[2].set(xlabel="std of a token's logits over experts", ylabel="tokens", title="Logit spread (eval set)")
axes[3].set(xlabel="training step", ylabel="mean logsumexp", title="Router logsumexp in training")
axes[0].legend(fontsize=8)
save(fig, "router_logits.png")
metrics["router_logits"] = {label: {k: RUNS[name][k] for k in ("mean_lse", "mean_max_logit", "mean_logit_std",
                                                               "mean_abs_logit", "eval_loss",
                                                               "max_expert_load_fraction")}
                            for name, label in [("aux", "none"), ("aux_z", "z_loss"), ("aux_jitter", "jitter")]}
metrics["router_logits"]["coefficients"] = {"aux_loss_coef": AUX, "z_loss_coef": Z, "jitter_eps": JITTER}
for k, v in metrics["router_logits"].items():
    print(f"{k:>12}: " + ", ".join(f"{kk} {vv:.3g}" for kk, vv in v.items()))

# %% [markdown]
# ## 7. Capacity factor: dropped tokens, loss and throughput
#
# With a capacity factor `cf`, each expert processes at most `ceil(cf * T * k / E)` slots per batch;
# the overflow is dropped (the token keeps only its residual path for that slot). We take the two
# trained models (with and without the load-balancing loss) and evaluate them at several capacity
# factors: the fraction of dropped slots, the eval loss and the forward throughput.
# An unbalanced router drops far more at the same capacity.

# %%
t0 = time.perf_counter()
CFS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, None]
capacity = {}
for name in ["no_aux", "aux"]:
    model = RUNS[name]["model"]
    model.eval()
    rows = []
    for cf in CFS:
        for m in model.moe_layers():
            m.capacity_factor = cf
        with torch.no_grad():
            loss = float(lm_loss(model, EVAL_TOKENS))
            drop = sum(float(m.last_stats["drop_fraction"]) for m in model.moe_layers()) / cfg.layers
            ms = best_ms(lambda: model(EVAL_TOKENS[:, :-1]), cfg.reps)
        rows.append({"capacity_factor": cf, "drop_fraction": drop, "eval_loss": loss,
                     "tokens_per_second": EVAL_TOKENS[:, :-1].numel() / ms * 1e3})
    for m in model.moe_layers():
        m.capacity_factor = None
    model.train()
    capacity[name] = rows
metrics["capacity"] = capacity
metrics["seconds"]["capacity"] = time.perf_counter() - t0

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
xs = list(range(len(CFS)))  # evenly spaced, labelled with the factors
for name in ["no_aux", "aux"]:
    rows = capacity[name]
    for ax, key in zip(axes, ["drop_fraction", "eval_loss", "tokens_per_second"]):
        ax.plot(xs, [r[key] for r in rows], "o-", label=name)
for ax, (key, title) in zip(axes, [("dropped slots", "Dropped fraction"), ("eval loss", "Eval loss"),
                                   ("tokens / s (forward)", "Throughput")]):
    ax.set(xlabel="capacity factor", ylabel=key, title=title)
    ax.set_xticks(xs, [f"{cf:g}" if cf is not None else "none" for cf in CFS])
axes[0].legend(fontsize=8)
save(fig, "capacity.png")
for name in capacity:
    print(name, [(r["capacity_factor"], round(r["drop_fraction"], 3), round(r["eval_loss"], 3)) for r in capacity[name]])

# %% [markdown]
# ## 8. The capacity-compute trade-off
#
# An MoE layer with E experts of hidden size F and top-k routing has E times an expert's parameters,
# but each token only runs k experts: its *active* parameters and FLOPs are those of a dense FFN of
# hidden size k*F (plus the small router). We compare such a dense FFN with MoE layers of growing E
# on one batch of tokens: total and active parameters, FLOPs per token (2 per multiply-add) and the
# measured forward time; plus the textbook loop at E = 8 for contrast.
#
# And in training: the dense transformer of the same active size as the MoE ones, trained like them.

# %%
t0 = time.perf_counter()
Hb, Fb, Tb = cfg.bench_d_model, cfg.bench_d_ff, cfg.bench_tokens
xb = torch.randn(Tb, Hb)
bench = []


def add_bench(name, module, total, active, flops):
    with torch.no_grad():
        ms = best_ms(lambda: module(xb), cfg.reps)
    bench.append({"name": name, "total_params": total, "active_params": active, "flops_per_token": flops,
                  "ms": ms, "us_per_token": ms * 1e3 / Tb})


expert_params = 3 * Hb * Fb  # SwiGLU: gate and up [F, H], down [H, F]
add_bench(f"dense F={cfg.top_k * Fb}", DenseFFN(Hb, cfg.top_k * Fb), cfg.top_k * expert_params,
          cfg.top_k * expert_params, 2 * cfg.top_k * expert_params)
for e in cfg.bench_experts:
    torch.manual_seed(cfg.seed)
    moe = moe_ext.MoELayer(Hb, Fb, e, cfg.top_k)
    add_bench(f"MoE E={e}", moe, e * expert_params + e * Hb, cfg.top_k * expert_params + e * Hb,
              2 * (cfg.top_k * expert_params + e * Hb))
    if e == cfg.num_experts:
        add_bench(f"textbook E={e}", TextbookMoE(Hb, Fb, e, cfg.top_k).load_from(moe),
                  e * expert_params + e * Hb, cfg.top_k * expert_params + e * Hb,
                  2 * (cfg.top_k * expert_params + e * Hb))
metrics["compute"] = {"d_model": Hb, "d_ff": Fb, "tokens": Tb, "top_k": cfg.top_k, "layers": bench}
metrics["seconds"]["compute_bench"] = time.perf_counter() - t0

t0 = time.perf_counter()
train("dense", ffn="dense")
metrics["seconds"]["train_dense"] = time.perf_counter() - t0

fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
names = [b["name"] for b in bench]
colors = ["tab:gray" if n.startswith("dense") else "tab:red" if n.startswith("textbook") else "tab:blue"
          for n in names]
for ax, key, scale, label in [(axes[0], "total_params", 1e6, "total parameters (M)"),
                              (axes[1], "active_params", 1e6, "active parameters / token (M)"),
                              (axes[2], "flops_per_token", 1e6, "MFLOPs / token"),
                              (axes[3], "us_per_token", 1, "measured µs / token (forward)")]:
    ax.bar(range(len(bench)), [b[key] / scale for b in bench], color=colors)
    ax.set_xticks(range(len(bench)), names, rotation=45, ha="right", fontsize=8)
    ax.set_title(label, fontsize=10)
fig.suptitle(f"One FFN layer, d_model={Hb}, expert d_ff={Fb}, top-{cfg.top_k}, {Tb} tokens", fontsize=10)
save(fig, "capacity_compute.png")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
for name in ["dense", "no_aux", "aux", "aux_z", "aux_jitter"]:
    h = RUNS[name]["hist"]
    ax.plot(h["step"], h["loss"], label=f"{name} ({RUNS[name]['params'] / 1e3:.0f}k params)")
ax.set(xlabel="training step", ylabel="train loss (cross-entropy)", title="Training: dense vs MoE, same active size")
ax.legend(fontsize=8)
save(fig, "training_loss.png")
metrics["runs"] = {n: {k: v for k, v in r.items() if k not in ("model", "routing", "hist")} for n, r in RUNS.items()}
for b in bench:
    print(f"{b['name']:>14}: {b['total_params'] / 1e6:6.2f} M params, {b['active_params'] / 1e6:5.2f} M active, "
          f"{b['flops_per_token'] / 1e6:5.2f} MFLOP/token, {b['us_per_token']:.3f} µs/token")
print({n: round(r["eval_loss"], 3) for n, r in RUNS.items()})

# %% [markdown]
# ## Summary
#
# `metrics.json` in the output directory holds every number above; the figures are next to it.

# %%
metrics["total_seconds"] = time.perf_counter() - T_START
with open(os.path.join(OUT, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
print(f"wrote {len(metrics['figures'])} figures and metrics.json to {OUT} in {metrics['total_seconds']:.1f} s")
