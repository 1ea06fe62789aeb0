"""IC-Cache's pure decisions on a virtual clock: example selection, the model-choosing bandit,
value-per-byte eviction, replay, and scrubbing personal data."""
import numpy as np
import pytest

from pdserve.clock import VirtualClock
from pdserve.policy.iccache.bandit import Arm, BanditConfig, ModelChooser, context
from pdserve.policy.iccache.examples import CacheConfig, Example, ExampleCache
from pdserve.policy.iccache.scrub import scrub
from pdserve.policy.iccache.selection import ExampleSelector, SelectionConfig

DAY_S = 24 * 3600.0


def make_example(example_id: int, text: str = "q", answer: str = "a", now_s: float = 0.0, dim: int = 4) -> Example:
    v = np.zeros(dim, dtype=np.float32)
    v[example_id % dim] = 1.0
    return Example(example_id, text, answer, "large", v, created_s=now_s, value_at_s=now_s)


# ---- selection ----

def test_selection_prefilters_by_similarity_caps_at_k_and_lays_examples_out_by_id():
    sel = ExampleSelector(SelectionConfig(min_similarity=0.5, max_examples=2))
    exs = {i: make_example(i) for i in (7, 3, 9, 1)}
    chosen = sel.select([(exs[7], 0.95), (exs[3], 0.9), (exs[9], 0.97), (exs[1], 0.3)])
    assert [c.example.example_id for c in chosen] == [7, 9]          # two best, then in id order
    assert all(c.similarity >= 0.5 for c in chosen)
    again = sel.select([(exs[9], 0.97), (exs[7], 0.95)])               # another request, same two
    assert [c.example.example_id for c in again] == [7, 9]           # same layout: a shared prefix


def test_selection_learns_which_examples_help():
    sel = ExampleSelector(SelectionConfig(min_similarity=0.0, max_examples=1))
    good, bad = make_example(1), make_example(2)
    for _ in range(40):
        for ex, success in ((good, True), (bad, False)):
            chosen = sel.select([(ex, 0.8)])
            ex.num_uses += 1
            ex.num_successes += success
            if chosen:
                sel.learn(chosen, success)
    assert sel.utility(0.8, good) > 0.7 > sel.utility(0.8, bad)
    picked = sel.select([(good, 0.8), (bad, 0.85)])
    assert [c.example.example_id for c in picked] == [1]


def test_threshold_is_tuned_on_outcomes():
    sel = ExampleSelector(SelectionConfig(min_similarity=0.0, min_outcomes_to_tune=10, learning_rate=0.0))
    ex = make_example(1)
    # Utilities below 0.8 failed, above succeeded: the tuned cut sits between them.
    for sim, success in [(0.3, False), (0.4, False), (0.5, False), (0.6, False), (0.9, True), (1.0, True)] * 3:
        chosen = sel.select([(ex, sim)])
        if not chosen:
            continue
        sel.learn(chosen, success)
    assert sel.utility(0.6, ex) < sel.threshold <= sel.utility(0.9, ex)


def test_tuned_threshold_is_the_most_accurate_cut_ties_to_the_higher():
    """The sweep picks the cut a brute-force count over every candidate would pick."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        sel = ExampleSelector(SelectionConfig(min_outcomes_to_tune=1))
        utilities = np.round(rng.random(rng.integers(1, 80)), rng.integers(1, 4))
        pairs = [(float(u), float(rng.random() < u)) for u in utilities]
        sel._outcomes.extend(pairs)
        sel._tune()
        cuts = {u for u, _ in pairs} | {sel.config.initial_threshold}
        right = {c: sum((u >= c) == (label == 1.0) for u, label in pairs) for c in cuts}
        assert sel.threshold == max(cuts, key=lambda c: (right[c], c))


def test_failures_below_the_threshold_never_stop_selection():
    """On a hard task offloads mostly fail, so every predicted utility soon sits below the initial
    threshold. The best candidate is still offered (the bandit decides whether it is worth an
    offload), so the selector keeps seeing outcomes and learns which examples do better."""
    sel = ExampleSelector(SelectionConfig(min_similarity=0.5, max_examples=3))
    exs = [make_example(i) for i in range(1, 5)]
    for _ in range(30):
        chosen = sel.select([(ex, 0.6 + 0.05 * i) for i, ex in enumerate(exs)])
        assert chosen, "a selector that selects nothing learns nothing"
        sel.learn(chosen, False)
    assert all(sel.utility(0.75, ex) < sel.threshold for ex in exs)
    best = sel.select([(exs[0], 0.6), (exs[1], 0.75)])
    assert [c.example.example_id for c in best] == [2]       # only the best: the rest are below the cut
    assert sel.select([(exs[0], 0.3)]) == []                  # the similarity pre-filter still holds


# ---- the bandit ----

def _train(chooser: ModelChooser, quality: dict[Arm, float], rounds: int, load=None) -> dict[Arm, int]:
    x = context(0.9, 0.7, 2, 3, 300)
    picks = {Arm.LARGE: 0, Arm.SMALL_WITH_EXAMPLES: 0}
    for _ in range(rounds):
        arm = chooser.choose(x, load or {}).arm
        picks[arm] += 1
        chooser.learn(arm, x, quality[arm])
    return picks


def test_bandit_learns_to_prefer_the_better_arm():
    worse_small = ModelChooser(BanditConfig(load_penalty_l0=0.0), seed=1)
    _train(worse_small, {Arm.LARGE: 0.9, Arm.SMALL_WITH_EXAMPLES: 0.3}, 200)
    late = _train(worse_small, {Arm.LARGE: 0.9, Arm.SMALL_WITH_EXAMPLES: 0.3}, 100)
    assert late[Arm.LARGE] >= 90

    better_small = ModelChooser(BanditConfig(load_penalty_l0=0.0), seed=1)
    _train(better_small, {Arm.LARGE: 0.6, Arm.SMALL_WITH_EXAMPLES: 0.9}, 200)
    late = _train(better_small, {Arm.LARGE: 0.6, Arm.SMALL_WITH_EXAMPLES: 0.9}, 100)
    assert late[Arm.SMALL_WITH_EXAMPLES] >= 90


def test_learned_state_survives_a_round_trip_through_json():
    import json

    trained = ModelChooser(BanditConfig(load_penalty_l0=0.0), seed=1)
    _train(trained, {Arm.LARGE: 0.6, Arm.SMALL_WITH_EXAMPLES: 0.9}, 100)
    trained.paused = True
    fresh = ModelChooser(BanditConfig(load_penalty_l0=0.0), seed=1)
    fresh.restore(json.loads(json.dumps(trained.state())))
    assert fresh.stats() == trained.stats() and fresh.paused
    x = context(0.9, 0.7, 2, 3, 100)
    assert fresh.expected_quality(Arm.SMALL_WITH_EXAMPLES, x) == trained.expected_quality(Arm.SMALL_WITH_EXAMPLES, x)

    sel = ExampleSelector(SelectionConfig(min_similarity=0.0, max_examples=1))
    ex = make_example(1)
    for success in (True, False, True, True):
        sel.learn(sel.select([(ex, 0.8)]) or [], success)
    copy = ExampleSelector(SelectionConfig(min_similarity=0.0, max_examples=1))
    copy.restore(json.loads(json.dumps(sel.state())))
    assert copy.state() == sel.state() and copy.utility(0.8, ex) == sel.utility(0.8, ex)
    copy.restore({"weights": [1.0], "threshold": 0.9})        # another feature layout: ignored
    assert copy.state() == sel.state()


def test_bandit_backs_off_the_loaded_costly_arm():
    quality = {Arm.LARGE: 0.85, Arm.SMALL_WITH_EXAMPLES: 0.75}     # large a little better
    idle = ModelChooser(seed=2)
    _train(idle, quality, 200)
    idle_picks = _train(idle, quality, 100, {Arm.LARGE: 0.0, Arm.SMALL_WITH_EXAMPLES: 0.0})
    loaded = ModelChooser(seed=2)
    _train(loaded, quality, 200)
    loaded_picks = _train(loaded, quality, 100, {Arm.LARGE: 1.0, Arm.SMALL_WITH_EXAMPLES: 0.1})
    assert idle_picks[Arm.LARGE] >= 80                      # idle: quality wins
    assert loaded_picks[Arm.SMALL_WITH_EXAMPLES] >= 80      # loaded: 0.1 quality is worth the relief


def test_paused_or_no_examples_means_the_large_model():
    chooser = ModelChooser(seed=3)
    x = context(0.9, 0.9, 3, 3, 100)
    _train(chooser, {Arm.LARGE: 0.1, Arm.SMALL_WITH_EXAMPLES: 1.0}, 100)
    assert chooser.choose(x, {}, small_possible=False).arm is Arm.LARGE
    chooser.paused = True
    assert chooser.choose(x, {}).arm is Arm.LARGE


def test_bandit_is_deterministic_for_a_seed():
    a, b = ModelChooser(seed=5), ModelChooser(seed=5)
    q = {Arm.LARGE: 0.7, Arm.SMALL_WITH_EXAMPLES: 0.6}
    assert _train(a, q, 50) == _train(b, q, 50)


# ---- eviction and replay ----

def test_eviction_goes_by_decayed_value_per_byte_and_respects_capacity():
    clock = VirtualClock(0.0)
    cache = ExampleCache(CacheConfig(capacity_bytes=3 * 100 + 3 * 16, value_half_life_s=DAY_S))
    old_star = make_example(1, "x" * 50, "y" * 50)
    steady = make_example(2, "x" * 50, "y" * 50)
    fresh = make_example(3, "x" * 50, "y" * 50)
    for ex in (old_star, steady, fresh):
        assert cache.add(ex, clock.now_s()) == []
    for _ in range(4):
        cache.record_offload([1], True, clock.now_s())      # popular a week ago
    clock.advance(7 * DAY_S)
    cache.record_offload([2], True, clock.now_s())          # useful today
    assert cache.value_now(old_star, clock.now_s()) < cache.value_now(steady, clock.now_s())
    evicted = cache.add(make_example(4, "x" * 50, "y" * 50, clock.now_s()), clock.now_s())
    assert evicted == [3]                                   # unused, and its starting value has decayed
    evicted = cache.add(make_example(5, "x" * 50, "y" * 50, clock.now_s()), clock.now_s())
    assert evicted == [1]                                   # the star's week-old value is worth less
    assert cache.num_bytes <= cache.config.capacity_bytes and cache.num_evictions == 2
    big = make_example(6, "x" * 1000)
    assert cache.add(big, clock.now_s()) == [6] and 6 not in cache.examples


def test_a_bigger_example_needs_more_value_to_stay():
    cache = ExampleCache(CacheConfig(capacity_bytes=400))
    small, large = make_example(1, "x" * 20), make_example(2, "x" * 200)
    cache.add(small, 0.0)
    cache.add(large, 0.0)
    cache.record_offload([2], True, 0.0)                     # large: 1.5 value over ~217 bytes
    assert cache.add(make_example(3, "x" * 150), 0.0) == [2]  # small keeps 0.5 over ~37 bytes


@pytest.mark.parametrize("seed", range(5))
def test_eviction_picks_what_a_scan_of_every_example_picks(seed):
    """The heap's victims are the scan's (lowest decayed value per byte, then lowest id) through
    random adds, rewarded offloads that raise values, replays that change sizes, and restores."""
    rng = np.random.default_rng(seed)
    cache = ExampleCache(CacheConfig(capacity_bytes=2_000, value_half_life_s=DAY_S))
    now_s = 1.8e9                                     # unix seconds: the keys must not overflow

    def scan_victim() -> int:
        return min(cache.examples.values(),
                   key=lambda e: (cache.value_now(e, now_s) / e.num_bytes, e.example_id)).example_id
    for example_id in range(400):
        now_s += float(rng.exponential(3600.0))
        if cache.examples and rng.random() < 0.3:
            cache.record_offload([int(rng.choice(list(cache.examples)))], success=True, now_s=now_s)
        if cache.examples and rng.random() < 0.1:
            cache.apply_replay(int(rng.choice(list(cache.examples))), "r" * int(rng.integers(1, 80)), 0.9)
        ex = make_example(example_id, "q" * int(rng.integers(1, 60)), "a" * int(rng.integers(1, 120)), now_s)
        expected = []
        while cache.examples and cache.num_bytes - sum(cache.examples[i].num_bytes for i in expected) \
                + ex.num_bytes > cache.config.capacity_bytes:
            expected.append(min((e for e in cache.examples.values() if e.example_id not in expected),
                                key=lambda e: (cache.value_now(e, now_s) / e.num_bytes, e.example_id)).example_id)
        assert cache.add(ex, now_s) == expected
        assert cache.num_bytes <= cache.config.capacity_bytes
    assert cache.num_evictions > 100
    restored = ExampleCache(cache.config)
    for ex in cache.examples.values():
        restored.restore(ex)
    first = scan_victim()
    assert restored.add(make_example(999, "q" * 900, "a" * 900, now_s), now_s)[0] == first


def test_replay_targets_used_poor_answers_keeps_the_better_and_drops_hopeless_ones():
    cache = ExampleCache(CacheConfig(max_replays=5))
    poor_popular, poor_unused, good = make_example(1), make_example(2), make_example(3)
    for ex in (poor_popular, poor_unused, good):
        cache.add(ex, 0.0)
    cache.rate_answer(1, 0.1)
    cache.rate_answer(2, 0.1)
    cache.rate_answer(3, 0.95)
    cache.record_offload([1], True, 0.0)
    assert [e.example_id for e in cache.replay_candidates(0.0, 3)] == [1, 2, 3]
    assert cache.apply_replay(1, "better answer", 0.9) == "replaced"
    assert cache.examples[1].answer_text == "better answer"
    assert cache.apply_replay(1, "worse", 0.2) == "kept" and cache.examples[1].answer_text == "better answer"
    outcomes = [cache.apply_replay(2, "still bad", 0.05) for _ in range(5)]
    assert outcomes == ["kept"] * 4 + ["dropped"] and 2 not in cache.examples
    for _ in range(3):
        cache.apply_replay(1, "meh", 0.5)
    assert 1 not in {e.example_id for e in cache.replay_candidates(0.0, 10)}   # five replays: no more
    assert 1 in cache.examples                                               # but a good one stays


@pytest.mark.parametrize("text, expected", [
    ("mail me at jane.doe+x@example.co.uk today", "mail me at [EMAIL] today"),
    ("card 4111 1111 1111 1111 expires", "card [CARD] expires"),
    ("order 1234 5678 9012 3456 shipped", "order 1234 5678 9012 3456 shipped"),    # fails Luhn: not a card
    ("call +1 (415) 555-0134 now", "call [PHONE] now"),
    ("server 192.168.10.254 is down", "server [IP] is down"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
    ("What is 12 * 7?", "What is 12 * 7?"),
])
def test_scrub_removes_obvious_personal_data(text, expected):
    assert scrub(text) == expected


def test_token_f1_scores_against_a_gold_answer():
    from pdserve.policy.iccache.scoring import token_f1
    assert token_f1("The capital is Paris.", "Paris") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("paris", "Paris!") == 1.0 and token_f1("Lyon", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "Paris") == 0.0
