"""Activation memory: checkpointing (torch.utils.checkpoint) around MoELayer, the aux loss attached to
the output (moe_ext.losses.attach_aux_loss), and recompute=True. Each gives the gradients of the plain
layer with the aux loss added to the loss."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_ext
from moe_ext import functional as MF
from conftest import _NO_GPU

KW = dict(aux_loss_coef=0.1, z_loss_coef=0.01, jitter_eps=0.1)  # jitter: RNG replayed by the recomputation


def _layer(**kw):
    torch.manual_seed(0)
    return moe_ext.MoELayer(24, 16, 7, 3, **{**KW, **kw}).double()


def _grads(layer, x, run, add_aux=True, loss_scale=1.0):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(5)
    y = run(layer, x)
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)).sum()
    if add_aux:
        loss = loss + layer.aux_loss
    (loss * loss_scale).backward()
    return y.detach(), [x.grad] + [p.grad for p in layer.parameters()]


def _plain(layer, x):
    return layer(x)


def _assert_same(a, b, scale=None):
    """Same outputs, and the same gradients bit for bit (the same ops on the same values), or b's
    times scale."""
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    for ga, gb in zip(a[1], b[1]):
        if scale is None:
            torch.testing.assert_close(ga, gb, atol=0, rtol=0)
        else:
            torch.testing.assert_close(ga, gb * scale)


@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.75}, {"num_shared_experts": 1}])
def test_non_reentrant_checkpoint_matches_plain(kw):
    layer, x = _layer(**kw), torch.randn(2, 9, 24, dtype=torch.float64)
    want = _grads(layer, x, _plain)
    got = _grads(layer, x, lambda m, t: checkpoint(m, t, use_reentrant=False))
    _assert_same(got, want)
    assert want[1][1].abs().sum() > 0  # the router's gradient, which the aux loss feeds


def test_reentrant_checkpoint_with_attached_aux_loss_matches_plain():
    x = torch.randn(13, 24, dtype=torch.float64)
    want = _grads(_layer(), x, _plain)
    layer = _layer(attach_aux_loss=True)
    for run in (_plain, lambda m, t: checkpoint(m, t, use_reentrant=True),
                lambda m, t: checkpoint(m, t, use_reentrant=False)):
        # .aux_loss is detached when attached: adding it to the loss, or not, changes no gradient.
        _assert_same(_grads(layer, x, run, add_aux=False), want)
        _assert_same(_grads(layer, x, run, add_aux=True), want)
        assert not layer.aux_loss.requires_grad and layer.aux_loss > 0


def test_reentrant_checkpoint_without_attaching_warns():
    layer, x = _layer(), torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="use_reentrant=False, or MoELayer\\(attach_aux_loss=True\\)"):
        checkpoint(layer, x, use_reentrant=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x.detach())  # a training forward under no_grad on plain inputs is not reentrant checkpointing
        layer.eval()
        layer(x)  # nor is evaluation


def test_aux_loss_grad_scale_follows_the_loss_scale():
    x = torch.randn(11, 24, dtype=torch.float64)
    want = _grads(_layer(), x, _plain)
    layer = _layer(attach_aux_loss=True)
    layer.aux_loss_grad_scale = 64.0  # e.g. a GradScaler's scale: the main loss is multiplied by it too
    _assert_same(_grads(layer, x, _plain, add_aux=False, loss_scale=64.0), want, scale=64.0)


def test_attached_aux_loss_compiles():
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(16, 24, 4, 2, aux_loss_coef=0.01, attach_aux_loss=True)
    x = torch.randn(12, 16, requires_grad=True)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, layer(x))
    (got,) = torch.autograd.grad(y.sum(), layer.router.weight)
    layer.attach_aux_loss = False
    (want,) = torch.autograd.grad(layer(x).sum() + layer.aux_loss, layer.router.weight)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------ recompute=True
def _layer_pair(**kw):
    """Two identical fp64 layers, E=7, H=72, k=3; the second recomputes in its backward."""
    torch.manual_seed(3)
    plain = moe_ext.MoELayer(72, 40, 7, 3, **kw).double()
    again = moe_ext.MoELayer(72, 40, 7, 3, recompute=True, **kw).double()
    again.load_state_dict(plain.state_dict())
    return plain, again


@pytest.mark.parametrize("activation", sorted(MF.ACTIVATIONS))
@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"capacity_factor": 0.6, "overflow": "reroute"},
                                {"routing": "expert_choice"}, {"num_shared_experts": 1, "aux_loss_coef": 0.1}])
def test_recompute_gives_the_same_gradients(activation, kw):
    plain, again = _layer_pair(activation=activation, **kw)
    x = torch.randn(3, 9, 72, dtype=torch.float64)
    _assert_same(_grads(again, x, _plain), _grads(plain, x, _plain))


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves while fn runs."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_recompute_saves_the_grouped_tokens_and_the_activation():
    T, H, Fd, k = 13, 72, 40, 3
    plain, again = _layer_pair()
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    saved_plain, saved_again = _saved_bytes(lambda: plain(x)), _saved_bytes(lambda: again(x))
    # x_sorted [T*k, H] and act(h) [T*k, F] are no longer saved; x is saved by the router already.
    assert saved_plain - saved_again == T * k * (H + Fd) * 8


@pytest.mark.parametrize("needs", ["x", "weights", "biases"])
def test_recompute_with_some_inputs_frozen(needs):
    T, H, Fd, E, k = 10, 24, 16, 5, 2
    g = torch.Generator().manual_seed(4)
    x, w1, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((T, H), (E, 2 * Fd, H), (E, H, Fd)))
    b1, b2 = torch.randn(E, 2 * Fd, generator=g, dtype=torch.float64), torch.randn(E, H, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    leaves = {"x": [x], "weights": [w1, w2], "biases": [b1, b2]}[needs]
    for t in leaves:
        t.requires_grad_()
    outs = [moe_ext.fused_moe(x, w1, w2, logits, k, w1_bias=b1, w2_bias=b2, recompute=r) for r in (False, True)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    gy = torch.randn(T, H, generator=g, dtype=torch.float64)
    want, got = (torch.autograd.grad(o, leaves, gy) for o in outs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_recompute_gradcheck_and_no_double_backward():
    T, H, Fd, E, k = 6, 8, 5, 4, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, 2 * Fd, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, H, Fd, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64)
    fn = lambda x, w1, w2: moe_ext.fused_moe(x, w1, w2, logits, k, recompute=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, w2))
    (gx,) = torch.autograd.grad(fn(x, w1, w2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("activation", ["swigluoai", "gelu_no_mul"])
def test_permute_expert_ffn_transposed_weights(activation):
    """transposed=True takes w1 [E, H, 2F | F] and w2 [E, F, H] as they are (transformers' is_transposed):
    the same result as the [E, out, in] copies, with and without recompute, and gradcheck."""
    T, H, Fd, E, k = 7, 6, 5, 4, 2
    g = torch.Generator().manual_seed(0)
    rows = 2 * Fd if MF.ACTIVATIONS[activation][1] else Fd
    x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(E, H, rows, generator=g, dtype=torch.float64) * 2).requires_grad_()
    w2 = torch.randn(E, Fd, H, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(E, rows, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randn(T, E, generator=g).topk(k, -1).indices.to(torch.int32)
    want = MF.permute_expert_ffn(x, ids, E, w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(),
                                 activation, b1)[0]
    for recompute in (False, True):
        got = MF.permute_expert_ffn(x, ids, E, w1, w2, activation, b1, recompute=recompute, transposed=True)[0]
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        assert torch.autograd.gradcheck(
            lambda *a: MF.permute_expert_ffn(a[0], ids, E, a[1], a[2], activation, a[3], recompute=recompute,
                                             transposed=True)[0], (x, w1, w2, b1))
    with pytest.raises(ValueError, match=r"w1 must be \[E, (2F|F), H\]|w2 must be"):
        MF.permute_expert_ffn(x, ids, E, w1, w2, activation, b1, transposed=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])])
def test_recompute_under_autocast_and_no_grad(device):
    plain, again = moe_ext.MoELayer(64, 48, 5, 2).to(device), moe_ext.MoELayer(64, 48, 5, 2, recompute=True).to(device)
    again.load_state_dict(plain.state_dict())
    x = torch.randn(14, 64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, want = _grads(again, x, _plain), _grads(plain, x, _plain)
    assert got[0].dtype == torch.bfloat16
    _assert_same(got, want)
    with torch.no_grad():
        torch.testing.assert_close(again(x), plain(x), atol=0, rtol=0)


def test_recompute_compiles():
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(16, 24, 4, 2, recompute=True, capacity_factor=1.0)
    x = torch.randn(12, 16, requires_grad=True)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, layer(x))
    got = torch.autograd.grad(y.square().sum(), [x, layer.experts.w1, layer.experts.w2])
    want = torch.autograd.grad(layer(x).square().sum(), [x, layer.experts.w1, layer.experts.w2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _random_config(seed):
    """A random MoELayer configuration over the options that change the training path."""
    rng = __import__("random").Random(seed)
    E = rng.choice([3, 5, 7, 8])
    k = rng.randint(1, E)
    kw = dict(activation=rng.choice(sorted(MF.ACTIVATIONS)), bias=rng.random() < 0.3,
              score_func=rng.choice(["softmax", "sigmoid"]), aux_loss_coef=rng.choice([0.0, 0.1]),
              z_loss_coef=rng.choice([0.0, 0.01]), aux_loss_scope=rng.choice(["batch", "sequence", "global"]),
              attach_aux_loss=rng.random() < 0.3, num_shared_experts=rng.choice([0, 0, 1]))
    routing = rng.choice(["dropless", "drop", "probs", "reroute", "expert_choice"])
    if routing == "expert_choice":
        kw.update(routing="expert_choice", capacity_factor=rng.choice([None, 0.5, 1.5]))
    elif routing != "dropless":
        kw.update(capacity_factor=rng.choice([0.5, 1.0]), overflow="reroute" if routing == "reroute" else "drop",
                  drop_policy="probs" if routing == "probs" else "position")
    shape = (rng.randint(1, 3), rng.randint(0, 9), 24) if rng.random() < 0.7 else (rng.randint(0, 17), 24)
    return E, k, kw, shape, rng.random() < 0.3


@pytest.mark.parametrize("seed", range(24))
def test_option_combinations_train_and_recompute_agrees(seed):
    """Random combinations of the layer's training options: the forward and backward run, the
    gradients are finite, and recompute=True gives the same bits; under CPU autocast too."""
    E, k, kw, shape, autocast = _random_config(seed)
    torch.manual_seed(seed)
    plain = moe_ext.MoELayer(24, 16, E, k, **kw)
    again = moe_ext.MoELayer(24, 16, E, k, recompute=True, **kw)
    again.load_state_dict(plain.state_dict())
    x = torch.randn(*shape)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        got, want = _grads(again, x, _plain), _grads(plain, x, _plain)
    assert got[0].shape == x.shape
    _assert_same(got, want)
    for g in want[1]:
        assert g is None or torch.isfinite(g).all()
