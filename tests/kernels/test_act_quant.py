import pytest
import torch

from _kernel_util import poison
from quantkit.kernels import act_quant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(1, 96), (5, 300), (3, 20000)])  # 20000 > one-pass limit: two-pass loop
def test_per_token_quant_matches_ref(dev, dtype, M, K):
    g = torch.Generator().manual_seed(M * 7 + K)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10 + 0.01).to(dtype).to(dev)
    q = poison((M, K), torch.int8, dev)
    s = poison((M, 1), torch.float32, dev)
    act_quant.per_token_quant_triton(x, out_q=q, out_s=s)
    qr, sr = act_quant.per_token_quant_ref(x)
    assert torch.equal(s, sr)
    mism = (q.int() - qr.int()).abs()
    assert mism.max() <= 1 and (mism > 0).float().mean() <= 1e-3  # exact on CPU; a tie flip at most on GPU
    assert q.abs().max() <= 127 and q.abs().max() == 127  # symmetric range, row max hits 127
    # dequantization error is bounded by half a step per element
    err = (q.float() * s - x.float()).abs()
    assert (err <= s * 0.5 + 1e-6).all()


def test_per_token_quant_public_op_and_fake(dev):
    x = torch.randn(2, 3, 64, dtype=torch.float16, generator=torch.Generator().manual_seed(0)).to(dev)
    q, s = act_quant.per_token_quant(x)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 1) and q.dtype == torch.int8
    qr, sr = act_quant.per_token_quant_ref(x.reshape(6, 64))
    assert torch.equal(q.reshape(6, 64), qr)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq, fs = torch.ops.quantkit.per_token_quant(torch.empty(5, 32, dtype=torch.float16))
    assert fq.shape == (5, 32) and fs.shape == (5, 1)


@pytest.mark.parametrize("K", [64, 200])
@pytest.mark.parametrize("qmax", [127, 7])
def test_static_scale_and_a4_modes(dev, K, qmax):
    """The kernel's static per-tensor mode and its A4 range match quantize_symmetric_ref exactly."""
    g = torch.Generator().manual_seed(K + qmax)
    x = (torch.randn(9, K, generator=g) * 3).half().to(dev)
    # static: a scale calibrated on smaller data, so some values clip to +-qmax
    st = torch.tensor([float(x.float().abs().max()) / qmax / 2], device=dev)
    q, s = act_quant.per_token_quant_triton(x, qmax=qmax, static_scale=st,
                                            out_q=poison((9, K), torch.int8, dev), out_s=poison((9, 1), torch.float32, dev))
    want = act_quant.quantize_symmetric_ref(x, st.reshape(1, 1), qmax)
    assert torch.equal(q, want) and torch.equal(s, st.expand(9, 1))
    assert int(q.abs().max()) == qmax  # clipped
    qs, ss = act_quant.static_quant(x, st, qmax)
    assert torch.equal(qs, want)
    # dynamic A4: per-row max hits qmax
    q4, s4 = act_quant.per_token_quant_triton(x, qmax=qmax)
    q4r, s4r = act_quant.per_token_quant_ref(x, qmax)
    assert torch.equal(s4, s4r) and (q4.int() - q4r.int()).abs().max() <= 1
    assert int(q4.abs().max()) == qmax
