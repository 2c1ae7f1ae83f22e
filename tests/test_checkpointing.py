"""Activation checkpointing (torch.utils.checkpoint) around MoELayer, and the aux loss attached to the
output (moe_ext.losses.attach_aux_loss): the gradients equal those of the plain layer with the aux loss
added to the loss."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_ext

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
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if add_aux:
        loss = loss + layer.aux_loss
    (loss * loss_scale).backward()
    return y.detach(), [x.grad] + [p.grad for p in layer.parameters()]


def _plain(layer, x):
    return layer(x)


def _assert_same(a, b, scale=1.0):
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    for ga, gb in zip(a[1], b[1]):
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
