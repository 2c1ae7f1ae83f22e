"""moe_ext inside transformers on CUDA: register() (experts_implementation="moe_ext") and
replace_moe_blocks() against transformers' own implementations on the same GPU, logits and every
gradient, on the tiny random models of test_transformers.py. Runs only where a CUDA GPU is visible.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_ext.integrations import transformers as mt  # noqa: E402
from test_transformers import CONFIGS, REPLACE_TOL, REPLACEABLE, _build, _compare, _ids  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mt.register()
    yield


def _run_cuda(model, ids):
    """Logits and parameter gradients (on the CPU, for comparison) of one step of `model` on the GPU."""
    model.to(DEV).train(False)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids.to(DEV))
    g = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(1), dtype=out.logits.dtype)
    (out.logits * g.to(DEV)).sum().backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().cpu(), grads


@pytest.mark.parametrize("family", list(CONFIGS))
def test_register_matches_eager_on_cuda(family):
    ref = _build(family, "eager", torch.float64)
    ours = _build(family, "moe_ext", torch.float64, ref.state_dict())
    ids = _ids()
    _compare(_run_cuda(ours, ids), _run_cuda(ref, ids), dict(atol=1e-12, rtol=1e-10))


def test_register_float32_on_cuda():
    ref = _build("mixtral", "eager", torch.float32)
    ours = _build("mixtral", "moe_ext", torch.float32, ref.state_dict())
    ids = _ids()
    _compare(_run_cuda(ours, ids), _run_cuda(ref, ids), dict(atol=2e-5, rtol=2e-5))


@pytest.mark.parametrize("family", REPLACEABLE)
def test_replace_moe_blocks_matches_eager_on_cuda(family):
    ref = _build(family, "eager", torch.float64)
    ours = _build(family, "eager", torch.float64, ref.state_dict())
    mt.replace_moe_blocks(ours)
    ids = _ids()
    _compare(_run_cuda(ours, ids), _run_cuda(ref, ids), REPLACE_TOL)


def test_register_matches_grouped_mm_bfloat16_on_cuda():
    """bf16 on the GPU: moe_ext's CUTLASS grouped GEMM against transformers' grouped_mm experts."""
    ref = _build("qwen3_moe", "grouped_mm", torch.bfloat16)
    ours = _build("qwen3_moe", "moe_ext", torch.bfloat16, ref.state_dict())
    ids = _ids()
    la, _ = _run_cuda(ours, ids)
    lb, _ = _run_cuda(ref, ids)
    torch.testing.assert_close(la.float(), lb.float(), atol=0.1, rtol=0.05)
