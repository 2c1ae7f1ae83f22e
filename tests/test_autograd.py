"""The autograd rules registered on the ops themselves (csrc/autograd.cpp): torch.ops.moe_ext.* are
differentiable however they are called (directly, from a torch.export program), opcheck sees an
autograd kernel, and a second differentiation raises a clear error instead of a wrong answer."""
import warnings

import pytest
import torch

import moe_ext
from moe_ext import reference as R
from torch.utils._python_dispatch import TorchDispatchMode

ops = torch.ops.moe_ext


def _rg(x):
    return x.detach().clone().requires_grad_(True)


def grad_samples():
    """The differentiable ops, with float64 inputs of which some require grad."""
    torch.manual_seed(0)
    T, H, E, k = 9, 72, 7, 3
    logits = torch.randn(T, E, dtype=torch.float64)
    ids = ops.topk_gating(logits, k)[1]
    x = torch.randn(T, H, dtype=torch.float64)
    xs, off, rm = ops.permute(x, ids, E, -1)
    yield "topk_gating", (_rg(logits), k), {}
    yield "topk_gating", (_rg(logits), 2, "sigmoid", "softmax_topk", True, torch.randn(E).double(), 1, 1, 2.5), {}
    yield "topk_gating", (_rg(logits), 3, "softmax", "topk_softmax", False), {}
    yield "permute", (_rg(x), ids, E), {}
    yield "permute", (_rg(x), ids.long(), E, 12), {}
    yield "unpermute", (_rg(xs), rm, _rg(torch.rand(T, k, dtype=torch.float64))), {}
    yield "unpermute", (_rg(xs), rm, None), {}
    yield "grouped_gemm", (_rg(xs), _rg(torch.randn(E, H, 40, dtype=torch.float64)), off), {}
    yield "grouped_gemm", (xs, _rg(torch.randn(E, 40, H, dtype=torch.float64)), off, True,
                           _rg(torch.randn(E, 40, dtype=torch.float64))), {}
    yield "gated_activation", (_rg(torch.randn(T, 2 * 36, dtype=torch.float64)), "silu"), {}
    yield "gated_activation", (_rg(torch.randn(T, 2 * 10, dtype=torch.float64) * 3), "swigluoai"), {}


SAMPLES = list(grad_samples())
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(SAMPLES)]


def _as_function(name, args, kwargs):
    """(f, inputs): f(*inputs) calls the raw op with the grad-requiring args replaced by inputs and
    returns its floating-point outputs."""
    op = getattr(ops, name).default
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*inputs):
        call = list(args)
        for i, t in zip(where, inputs):
            call[i] = t
        out = op(*call, **kwargs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(o for o in out if o.is_floating_point())

    return f, [args[i] for i in where]


@pytest.mark.parametrize("name,args,kwargs", SAMPLES, ids=IDS)
def test_opcheck_requires_grad(name, args, kwargs):
    """opcheck with grad-requiring inputs: the autograd registration check and AOTAutograd's trace of
    the backward through the fake kernels."""
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


@pytest.mark.parametrize("name,args,kwargs", SAMPLES, ids=IDS)
def test_raw_op_gradcheck(name, args, kwargs):
    """The raw op is differentiable, with no "autograd kernel was not registered" fallback (a warning)
    on the way."""
    f, inputs = _as_function(name, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(o.requires_grad for o in f(*inputs)), name
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name,args,kwargs", SAMPLES, ids=IDS)
def test_no_grad_needed(name, args, kwargs):
    """Inputs that need no gradient (inference, frozen weights) give outputs without history."""
    f, inputs = _as_function(name, args, kwargs)
    with torch.no_grad():
        assert not any(o.requires_grad for o in f(*inputs))
    assert not any(o.requires_grad for o in f(*[t.detach() for t in inputs]))


@pytest.mark.parametrize("name,args,kwargs", SAMPLES, ids=IDS)
def test_double_backward_raises(name, args, kwargs):
    """create_graph=True gives the same first derivatives; differentiating them again raises an error
    that names the op (before: a silently zero or incomplete second derivative)."""
    f, inputs = _as_function(name, args, kwargs)
    torch.manual_seed(1)
    outs = f(*inputs)
    # The cotangents require grad too, so that even a backward that is linear in them (permute's) has
    # a second derivative to refuse.
    cot = [torch.randn_like(o).requires_grad_(True) for o in outs]
    first = torch.autograd.grad(outs, inputs, cot, allow_unused=True)
    graphed = torch.autograd.grad(f(*inputs), inputs, cot, create_graph=True, allow_unused=True)
    for a, b in zip(first, graphed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    used = [g for g in graphed if g is not None]
    assert used and all(g.requires_grad for g in used)
    with pytest.raises(RuntimeError, match=f"moe_ext::{name}: double backward is not supported"):
        torch.autograd.grad(sum((g * g).sum() for g in used), inputs + cot, allow_unused=True)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("wrt", ["a", "b", "bias", "all"])
def test_grouped_gemm_backward_computes_only_what_is_asked(wrt):
    """torch.autograd.grad(loss, a) runs no weight-gradient kernel, and the reverse."""
    torch.manual_seed(0)
    a, b, bias = _rg(torch.randn(10, 6)), _rg(torch.randn(3, 5, 6)), _rg(torch.randn(3, 5))
    off = torch.tensor([0, 4, 4, 10])
    inputs = {"a": [a], "b": [b], "bias": [bias], "all": [a, b, bias]}[wrt]
    c = ops.grouped_gemm(a, b, off, True, bias)
    log = _OpLog()
    with log:
        grads = torch.autograd.grad(c.square().sum(), inputs)
    wgrads = log.names.count("moe_ext.grouped_gemm_wgrad")
    dgrads = log.names.count("moe_ext.grouped_gemm")
    assert (dgrads, wgrads) == {"a": (1, 0), "b": (0, 1), "bias": (0, 1), "all": (1, 2)}[wrt], log.names
    ref = torch.autograd.grad(R.grouped_gemm(*[t.double() for t in (a, b)], off, True, bias.double()).square().sum(),
                              inputs)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


def test_layer_double_backward_raises():
    layer = moe_ext.MoELayer(16, 24, 5, 2).double()
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.square().sum().backward()


@pytest.mark.parametrize("kwargs", [{}, {"capacity_factor": 1.0, "overflow": "reroute", "bias": True},
                                    {"capacity_factor": 0.75}, {"routing": "expert_choice"},
                                    {"score_func": "sigmoid", "n_group": 2, "topk_group": 1, "num_shared_experts": 1}])
def test_export_training(kwargs):
    """A torch.export program calls the raw ops; run with parameters that require grad, its output and
    gradients equal the eager layer's."""
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(32, 48, 8, 3, **kwargs).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export notes that last_stats / aux_loss are plain attributes
        ep = torch.export.export(layer, (x,))
    exported = ep.module()
    xe, xr = _rg(x), _rg(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ye = exported(xe)
        ye.square().sum().backward()
    yr = layer(xr)
    yr.square().sum().backward()
    torch.testing.assert_close(ye, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-12, atol=1e-12)
    params = dict(exported.named_parameters())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("activation", ["silu", "gelu_no_mul"])
def test_export_dynamic_token_count(activation):
    """One exported program for any token count (dropless token choice; capacity and expert choice size
    their buffers from ceil(cf * T * k / E) and specialise on T)."""
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(24, 16, 5, 2, activation=activation).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(layer, (torch.randn(6, 24, dtype=torch.float64),),
                                 dynamic_shapes={"x": {0: torch.export.Dim("T", min=1, max=512)}})
    for T in (1, 7, 300):
        x = torch.randn(T, 24, dtype=torch.float64)
        torch.testing.assert_close(ep.module()(x), layer(x), rtol=1e-12, atol=1e-12)
