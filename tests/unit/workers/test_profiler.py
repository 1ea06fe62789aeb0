"""The profiler times pieces after earlier KV and the fit gains a past term (values are the
host's: only their shape is checked here; the benchmark compares predictions with timings)."""
import pathlib

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.workers.model.loader import load_model
from pdserve.workers.profiler import fit_cost_model, profile_past


def test_pieces_after_earlier_kv_are_timed_on_both_attention_paths():
    model = load_model("tiny", pathlib.Path("/nonexistent")).model
    limit = model.config.max_position_tokens
    samples = profile_past(model, shapes=((8, 64), (600, 64), (16, limit)), repeats=1)
    assert [(n, p) for n, p, _ in samples] == [(8, 64), (600, 64)]     # the last does not fit the context
    assert all(s > 0 for _, _, s in samples)


def test_the_fitted_model_carries_the_past_term_through_its_file():
    model = load_model("tiny", pathlib.Path("/nonexistent")).model
    cost, samples, _ = fit_cost_model(model, token_counts=(8, 32, 128), repeats=1, past_shapes=((8, 256), (64, 512)))
    assert {k for k, _, _ in samples} == {"attention", "mlp"}
    assert cost.attention_past_s >= 0.0
    assert OperatorCostModel.from_dict(cost.to_dict()) == cost


def test_a_deep_model_is_timed_once_per_shape_and_long_shapes_skip_the_warm_up(monkeypatch):
    """Start-up cost: runs per shape stop once enough per-layer samples are in; tiny (4 layers)
    keeps three, a 30-layer model one. The calls are recorded; the real timing is above."""
    from types import SimpleNamespace

    from pdserve.workers import profiler
    calls = []

    def record(model, new_tokens, past_tokens=0, seed=0):
        calls.append((new_tokens, past_tokens, seed))
        return [1e-3] * (2 * model.config.num_layers)
    monkeypatch.setattr(profiler, "operator_times_s", record)
    for layers, runs in ((4, 3), (30, 1)):
        calls.clear()
        model = SimpleNamespace(config=SimpleNamespace(num_layers=layers, max_position_tokens=4096))
        profiler.profile_operators(model, token_counts=(128, 2048), repeats=3)
        profiler.profile_past(model, shapes=((32, 1024), (256, 256)), repeats=3)
        warm_ups = [(n, p) for n, p, seed in calls if seed == 0]
        assert warm_ups == [(128, 0), (256, 256)]          # shapes under 1,024 tokens in all
        assert len(calls) == len(warm_ups) + 4 * runs
