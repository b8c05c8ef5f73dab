"""The pipeline with blocks on a CUDA device gives the CPU pipeline's results (skipped without a GPU)."""

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit.calib.pipeline import run_layerwise
from quantkit.methods.base import get_method
from quantkit.recipe import QuantArgs, Scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_pipeline_matches_cpu_and_offloads():
    ids = torch.randint(0, 512, (6, 48), generator=torch.Generator().manual_seed(0))
    cpu_model, gpu_model = make_tiny_model("qwen2", seed=9), make_tiny_model("qwen2", seed=9)
    ref = cpu_model.model(input_ids=ids).last_hidden_state
    res = run_layerwise(gpu_model, ids, [], device="cuda", batch_size=4, return_hidden=True)
    torch.testing.assert_close(torch.cat(res.hidden).cpu(), ref, rtol=2e-4, atol=2e-4)
    # every block went back to the CPU
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())

    rtn = lambda: get_method("rtn")(Scheme(QuantArgs(bits=4, group_size=32, symmetric=False)))  # noqa: E731
    a = run_layerwise(cpu_model, ids, [rtn()], device="cpu")
    b = run_layerwise(gpu_model, ids, [rtn()], device="cuda")
    assert a.results.keys() == b.results.keys()
    mismatched = sum(int((a.results[k].q != b.results[k].q).sum()) for k in a.results)
    total = sum(a.results[k].q.numel() for k in a.results)
    assert mismatched / total < 1e-4  # rounding ties may differ between CPU and GPU arithmetic
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())
