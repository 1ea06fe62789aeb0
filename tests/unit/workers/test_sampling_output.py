from collections import Counter

import torch

from pdserve.workers.model.sampling import SamplingConfig, sample_token
from pdserve.workers.model.tokenizer import ByteTokenizer
from pdserve.workers.output import Finish, OutputProcessor


def test_greedy_and_seeded_sampling_are_reproducible():
    logits = torch.randn(320, generator=torch.Generator().manual_seed(1))
    assert sample_token(logits, SamplingConfig(), 0) == int(logits.argmax())
    p = SamplingConfig(temperature=1.0, seed=7)
    draws = [sample_token(logits, p, i) for i in range(20)]
    assert draws == [sample_token(logits, p, i) for i in range(20)]
    assert len(set(draws)) > 1
    # A tiny nucleus keeps only the most likely token.
    assert sample_token(logits, SamplingConfig(temperature=1.0, top_p=1e-6, seed=1), 0) == int(logits.argmax())


def test_sampled_tokens_follow_the_distribution_and_its_nucleus():
    """Frequencies over 20,000 seeded draws (deterministic) match the probabilities; a token of
    probability 0 or outside the top_p nucleus is never drawn."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0])
    for top_p, expected in ((1.0, probs), (0.8, torch.tensor([0.5, 0.25, 0.15, 0, 0, 0]) / 0.9)):
        params = SamplingConfig(temperature=1.0, top_p=top_p, seed=11)
        draws = Counter(sample_token(probs.log(), params, i) for i in range(20_000))
        assert set(draws) == {int(t) for t in torch.nonzero(expected)}
        assert max(abs(draws[t] / 20_000 - float(p)) for t, p in enumerate(expected)) < 0.015, draws


def test_a_nucleus_wider_than_the_partial_sort_is_found_whole():
    # 1,000 nearly equal tokens: top_p 0.9 keeps the first 900 (more than the first try's 256).
    logits = -torch.arange(1000, dtype=torch.float32) * 1e-4
    probs = torch.softmax(logits, -1)
    nucleus = int(torch.count_nonzero(torch.cumsum(probs, 0) - probs < 0.9))
    draws = {sample_token(logits, SamplingConfig(temperature=1.0, top_p=0.9, seed=2), i) for i in range(5_000)}
    assert 880 < nucleus < 920 and max(draws) < nucleus and max(draws) > 256


def _feed(text: str, **params) -> tuple[str, Finish | None, int]:
    tok = ByteTokenizer()
    out = OutputProcessor(tok, SamplingConfig(**{"max_tokens": 100, **params}), 1, 4096)
    streamed, finish = "", None
    for t in tok.encode(text, add_bos=False):
        d = out.add(t)
        streamed += d.text
        if d.finish:
            finish = d.finish
            break
    return streamed, finish, len(out.token_ids)


def test_stop_sequence_is_cut_and_never_streamed():
    text, finish, _ = _feed("hello world. STOP here", stop=("STOP",))
    assert text == "hello world. " and finish is Finish.STOP


def test_max_tokens_and_eos():
    text, finish, n = _feed("abcdefgh", max_tokens=3)
    assert (text, finish, n) == ("abc", Finish.LENGTH, 3)
    tok = ByteTokenizer()
    out = OutputProcessor(tok, SamplingConfig(max_tokens=10), 1, 4096)
    out.add(ord("a"))
    assert out.add(tok.EOS_ID).finish is Finish.STOP


def test_incomplete_utf8_is_held_back():
    tok = ByteTokenizer()
    out = OutputProcessor(tok, SamplingConfig(max_tokens=10), 1, 4096)
    first, second = "é".encode()
    assert out.add(first).text == ""
    assert out.add(second).text == "é"


def test_min_tokens_suppresses_eos_and_stop_strings_until_reached():
    eos = ByteTokenizer.EOS_ID
    logits = torch.zeros(320)
    logits[eos] = 10.0
    p = SamplingConfig(min_tokens=2, max_tokens=5)
    assert all(sample_token(logits, p, i, (eos,)) != eos for i in range(2))
    assert sample_token(logits, p, 2, (eos,)) == eos                     # from the third token on
    assert sample_token(logits, SamplingConfig(min_tokens=2, ignore_eos=True), 0, (eos,)) == eos
    # "ab" would stop at once; with min_tokens=3 it is kept, and a later "ab" stops.
    assert _feed("abcab!", stop=("ab",), min_tokens=3) == ("abc", Finish.STOP, 5)
    assert _feed("abcab!", stop=("ab",)) == ("", Finish.STOP, 2)
