"""The host TMA descriptor memo (``_gluon.memo_tensordesc_arg``): a hit only where every input of the encoding is
the same, and the same result a fresh encoding gives.  The GPU suite runs every Gluon kernel with it on."""

import pytest
import torch

from quantkit.kernels import _gluon


class Desc:
    """What Triton 3.6's ``make_tensordesc_arg`` reads of a host descriptor."""

    def __init__(self, t, padding="zero"):
        self.base = t
        self.shape = list(t.shape)
        self.strides = list(t.stride())
        self.padding = padding


def meta(block=(64, 128), swizzle=128):
    return {"swizzle": swizzle, "elem_size": 2, "elem_type": 6, "block_size": list(block), "fp4_padded": False}


@pytest.fixture
def encode():
    calls = []

    def enc(arg, metadata):  # stands in for the driver's encoding: a fresh object each call, built from its inputs
        calls.append(1)
        return [object(), arg.base.data_ptr(), *arg.shape, *arg.strides, arg.padding,
                None if metadata is None else tuple(metadata["block_size"])]

    enc.calls = calls
    _gluon._TMA_MEMO.clear()
    prev = _gluon.set_tma_memo(True)
    yield enc
    _gluon.set_tma_memo(prev)
    _gluon._TMA_MEMO.clear()


def test_memo_hits_only_on_equal_inputs(encode):
    memo = _gluon.memo_tensordesc_arg(encode)
    w = torch.randn(256, 512, dtype=torch.float16)
    m = meta()
    first = memo(Desc(w), m)
    assert memo(Desc(w), m) is first and len(encode.calls) == 1  # same tensor, new descriptor object: a hit
    assert memo(Desc(w), meta()) is first and len(encode.calls) == 1  # an equal metadata dict: a hit
    others = [
        memo(Desc(w[:128]), m),  # shape
        memo(Desc(w[:, :256]), m),  # shape (the stride kept)
        memo(Desc(w.t().contiguous().t()), m),  # strides (and address)
        memo(Desc(w[1:]), m),  # address
        memo(Desc(w, padding="nan"), m),  # padding
        memo(Desc(w), meta(block=(128, 128))),  # box
        memo(Desc(w), meta(swizzle=64)),  # swizzle
    ]
    assert len(encode.calls) == 8 and all(o is not first for o in others)
    assert len({id(o) for o in others}) == len(others)
    for o, fresh in zip(others, [encode(Desc(w[:128]), m), encode(Desc(w[:, :256]), m)]):
        assert o[1:] == fresh[1:]  # what the encoding returns for those inputs


def test_memo_off_and_unencoded_pass_through(encode):
    memo = _gluon.memo_tensordesc_arg(encode)
    w = torch.randn(64, 64, dtype=torch.float16)
    a, b = memo(Desc(w), None), memo(Desc(w), None)  # no metadata: pointer + sizes, nothing to memoise
    assert a is not b and len(encode.calls) == 2
    _gluon.set_tma_memo(False)
    a, b = memo(Desc(w), meta()), memo(Desc(w), meta())
    assert a is not b and len(encode.calls) == 4 and not _gluon._TMA_MEMO


def test_install_only_on_the_known_encoding(monkeypatch):
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    import inspect

    fn = driver.make_tensordesc_arg
    known = list(inspect.signature(getattr(fn, "memo_of", fn)).parameters) == ["arg", "metadata"]
    monkeypatch.setattr(driver, "make_tensordesc_arg", getattr(fn, "memo_of", fn))
    assert _gluon.install_tma_memo() is known
    assert (getattr(driver.make_tensordesc_arg, "memo_of", None) is not None) is known
    assert _gluon.install_tma_memo() is known  # a second install keeps the one memo
    assert getattr(getattr(driver.make_tensordesc_arg, "memo_of", None), "memo_of", None) is None

    def three(arg, metadata, _):  # a later Triton's encoding, which reads more than the memo's key covers
        return [arg, metadata]

    monkeypatch.setattr(driver, "make_tensordesc_arg", three)
    assert _gluon.install_tma_memo() is False and driver.make_tensordesc_arg is three
