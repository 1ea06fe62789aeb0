"""benchmarks/sampling.py runs both samplers on the same distributions and prints one document;
its baseline draws from the same distribution as the current sampler."""
import importlib.util
import json
from collections import Counter

import torch

from pdserve.workers.model.sampling import SamplingConfig
from tests.conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("sampling_bench", REPO_ROOT / "benchmarks" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_reports_every_case(tmp_path, capsys):
    assert _script().main(["--repeats", "2", "--json", "--cache-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["case"].split(",")[0] for r in report["results"]] == ["one token"] * 2 + ["decode step"]
    assert all(r["now_vs_before"] > 0 for r in report["results"])


def test_the_baseline_samples_the_same_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    params = SamplingConfig(temperature=1.0, top_p=0.8, seed=5)
    baseline = _script().baseline_sample_token
    draws = Counter(baseline(probs.log(), params, i) for i in range(20_000))
    assert set(draws) == {0, 1, 2}
    assert max(abs(draws[t] / 20_000 - p / 0.9) for t, p in enumerate([0.5, 0.25, 0.15])) < 0.015
