"""One method run (quantkit.run.run_recipe) builds each stage's method once and plans its memory once."""

import pytest

from tiny_models import run_cli, save_tiny_model_dir


@pytest.mark.parametrize("method, extra", [
    ("rtn", ()),  # data-free: the calibration checks must not build methods to find that out
    ("gptq", ("--samples", "4", "--seqlen", "32", "--batch-size", "2", "--eval", "--windows", "2",
              "--eval-seqlen", "32")),
])
def test_a_run_builds_methods_once_and_plans_memory_once(tmp_path, monkeypatch, tiny_tokenizer, method, extra):
    import quantkit.plan
    from quantkit.methods.base import Method

    built, planned, checked = [], [], []
    real_init, real_plan, real_check = Method.__init__, quantkit.plan.plan_run, quantkit.plan.check_memory

    def counting_init(self, *a, **k):
        if not planned or planned[-1] != "planning":  # the memory plan reads its own copy (plan._rotation_training)
            built.append(type(self).__name__)
        real_init(self, *a, **k)

    def counting_plan(*a, **k):
        planned.append("planning")
        try:
            return real_plan(*a, **k)
        finally:
            planned[-1] = "planned"

    monkeypatch.setattr(Method, "__init__", counting_init)
    monkeypatch.setattr(quantkit.plan, "plan_run", counting_plan)
    monkeypatch.setattr(quantkit.plan, "check_memory", lambda *a, **k: checked.append(1) or real_check(*a, **k))
    model = save_tiny_model_dir(tmp_path / "m", tiny_tokenizer)
    code, text = run_cli(method, "--model", model, "--out", tmp_path / "out", "-g", "32", *extra)
    assert code == 0, text
    assert (tmp_path / "out" / "quantkit.json").is_file()
    assert len(built) == 1, f"{method} was built {len(built)} times in one run: {built}"
    assert (len(planned), len(checked)) == (1, 1), f"memory plan {len(planned)}x, memory check {len(checked)}x"
