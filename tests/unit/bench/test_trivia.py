"""The trivia data and statistics behind `pdserve bench iccache`."""
from __future__ import annotations

import pathlib
import random

import pytest

from pdserve.bench import trivia

LISTS = pathlib.Path(__file__).parents[2] / "data" / "trivia"


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert trivia.exact_match(" The  Beatles.", ("Beatles",))
    assert trivia.exact_match("new delhi", ("New Delhi",))
    assert trivia.exact_match("8", ("8", "eight"))
    assert not trivia.exact_match("Paris, France", ("Paris",))       # exact, not contained
    assert not trivia.exact_match("", ("",)) and not trivia.exact_match("the", ("a",))   # nothing left is no answer


def test_questions_load_once_with_string_aliases_and_without_pictures():
    questions = trivia.load_questions(LISTS, names=None)
    texts = [q.text for q in questions]
    assert "Who wrote Hamlet?" in texts and "AUTHOR" not in texts
    assert not any("http" in t for t in texts)
    spider = next(q for q in questions if q.text.startswith("How many legs"))
    assert spider.aliases == ("8", "eight")
    assert len(texts) == len(set(texts)) == 27
    with pytest.raises(SystemExit, match="no trivia lists"):
        trivia.load_questions(LISTS, names=("nope",))


def test_split_is_disjoint_seeded_and_refuses_too_few():
    questions = trivia.load_questions(LISTS, names=None)
    held, train, pool = trivia.split(questions, 10, 5, 12, seed=3)
    assert (len(held), len(train), len(pool)) == (10, 5, 12)
    assert not {q.text for q in held} & ({q.text for q in train} | {q.text for q in pool})
    assert not {q.text for q in train} & {q.text for q in pool}
    assert trivia.split(questions, 10, 5, 12, seed=3) == (held, train, pool)
    assert trivia.split(questions, 10, 5, 12, seed=4)[0] != held
    with pytest.raises(SystemExit, match="27 questions, 30 needed"):
        trivia.split(questions, 10, 10, 10, seed=0)


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = trivia.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = trivia.wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert trivia.wilson(0, 0) == (0.0, 1.0)


def test_paired_difference_tells_a_real_gap_from_noise():
    better = [True] * 80 + [False] * 20
    worse = [True] * 40 + [False] * 60
    gap = trivia.paired_difference(better, worse)
    assert gap["mean"] == 0.4 and gap["significant"] and gap["ci95"][0] > 0
    same = trivia.paired_difference(better, random.Random(0).sample(better, len(better)))
    assert not same["significant"]
    with pytest.raises(ValueError):
        trivia.paired_difference([True], [True, False])


def test_bootstrap_interval_contains_the_percentile():
    values = [float(v) for v in range(1, 201)]
    lo, hi = trivia.bootstrap_percentile(values, 0.5, seed=1)
    assert lo <= trivia.percentile(values, 0.5) <= hi and hi - lo < 40
