"""Decode scheduling policy: oldest sequences keep going, newest give blocks back, FIFO resume."""
from pdserve.policy.decode_scheduler import DecodeScheduler, SeqView

BS = 16


def test_everyone_runs_when_the_pool_has_room():
    plan = DecodeScheduler(10, BS, 8).schedule([SeqView("a", 32), SeqView("b", 20)], [], num_free_blocks=3)
    assert plan.run_ids == ("a", "b") and not plan.preempt_ids


def test_the_newest_is_preempted_when_one_block_is_left_for_two_boundaries():
    plan = DecodeScheduler(5, BS, 8).schedule([SeqView("old", 32), SeqView("new", 32)], [], num_free_blocks=1)
    assert plan.run_ids == ("old",) and plan.preempt_ids == ("new",) and not plan.resume_ids


def test_a_middle_boundary_preempts_from_the_tail_not_itself():
    seqs = [SeqView("a", 32), SeqView("b", 32), SeqView("c", 20)]
    plan = DecodeScheduler(8, BS, 8).schedule(seqs, [], num_free_blocks=1)
    # a takes the free block; b needs one: c (newest) gives back its 2 blocks and b runs.
    assert plan.run_ids == ("a", "b") and plan.preempt_ids == ("c",)


def test_resume_is_fifo_and_waits_for_room():
    sched = DecodeScheduler(20, BS, 8)
    waiting = [SeqView("first", 40), SeqView("second", 10)]
    assert sched.schedule([], waiting, num_free_blocks=2).resume_ids == ()        # first needs 3: nobody jumps
    assert sched.schedule([], waiting, num_free_blocks=4).resume_ids == ("first", "second")
    assert not sched.admits_new(len(waiting)) and sched.admits_new(0)


def test_a_sequence_that_can_never_fit_is_stopped():
    plan = DecodeScheduler(2, BS, 8).schedule([SeqView("huge", 32)], [], num_free_blocks=0)
    assert plan.stop_ids == ("huge",) and not plan.run_ids and not plan.preempt_ids
