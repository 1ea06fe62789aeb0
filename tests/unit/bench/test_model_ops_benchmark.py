"""benchmarks/model_ops.py's baseline (the attention before 2026-12-05) still computes what the
model computes, so its ratios compare equal work."""
import importlib.util

import torch

from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.llama import LlamaModel, random_weights
from tests.conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("model_ops", REPO_ROOT / "benchmarks" / "model_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_sides_of_every_case_give_the_same_logits():
    cfg = tiny_config()
    with torch.inference_mode():
        rows = _script().measure(LlamaModel(cfg, random_weights(cfg, 0)), repeats=1)
    assert [r["case"].split(",")[0].split(" ")[0] for r in rows] == ["prefill"] * 3 + ["prefix"] * 2 + ["decode"] * 4
    for r in rows:
        assert r["max_abs_output_difference"] < 1e-4, r
        assert r["before_p50_ms"] > 0 and r["now_p50_ms"] > 0
