"""End-to-end on the embedded default model (a real trained model): loading and RTN accuracy."""

import pytest
import torch

from quantkit import api
from quantkit.api import EvalConfig
from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return api.load()


def test_default_model_loads_clean(default_model, tmp_path):
    m = default_model.model
    assert m.config.model_type == "llama" and m.config.hidden_size == 576 and m.config.num_hidden_layers == 30
    assert getattr(m, "hf_quantizer", None) is None and not hasattr(m.config, "quantization_config")
    assert len(default_model.source["fingerprint"]) == 64
    m.config.save_pretrained(tmp_path)  # the GGUF quantizer config would block this


def test_rtn_w8_close_to_baseline_and_w4_worse(default_model):
    loaded = default_model
    cfg = EvalConfig(windows=3, seqlen=256)
    base, windows = api.evaluate(loaded.model, loaded.tokenizer, cfg)
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    try:
        w8 = api.quantize(loaded, Recipe(Scheme(QuantArgs(bits=8)), (Stage("rtn"),)))
        assert len(w8.modules) == 30 * 7
        p8, _ = api.evaluate(loaded.model, loaded.tokenizer, cfg, windows=windows)
        loaded.model.load_state_dict(original)
        api.quantize(loaded, Recipe(Scheme(QuantArgs(bits=4, group_size=64, symmetric=False)), (Stage("rtn"),)))
        p4, _ = api.evaluate(loaded.model, loaded.tokenizer, cfg, windows=windows)
    finally:
        loaded.model.load_state_dict(original)
    assert 5 < base.ppl < 40, base.ppl
    assert abs(p8.ppl / base.ppl - 1) < 0.01, (base.ppl, p8.ppl)
    assert p4.ppl > p8.ppl * 1.01, (p8.ppl, p4.ppl)


def test_group_128_refused_for_576_wide_layers(default_model):
    from quantkit.recipe import RecipeError

    with pytest.raises(RecipeError, match="does not divide in_features 576.*--group-size 64"):
        api.check_recipe_fits(default_model.model, Recipe(Scheme(QuantArgs(bits=4, group_size=128)), (Stage("rtn"),)))
