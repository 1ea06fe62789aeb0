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
