"""Every backend honours the same contract: data arrives intact, every failure is reported with a
reason on both sides, nothing waits past its deadline, and nothing stays tracked afterwards."""
import dataclasses
import threading

import numpy as np
import pytest

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState, create_agent, new_token
from pdserve.kvtransfer.backends.fake import FakeFabric
from pdserve.kvtransfer.faults import Faults, FaultyAgent
from tests.conftest import assert_no_leaks, wait_until

BACKENDS = ["fake", "tcp", "ucx"]
_ENDED = (TransferState.DONE, TransferState.FAILED)


@pytest.fixture(scope="module")
def agent_pairs():
    fabric = FakeFabric()
    options = {"fake": {"fabric": fabric}, "tcp": {"host": "127.0.0.1", "stall_timeout_s": 2.0},
               "ucx": {"stall_timeout_s": 2.0}}
    pairs = {b: (create_agent(b, WallClock(), **options[b]), create_agent(b, WallClock(), **options[b]))
             for b in BACKENDS}
    yield pairs
    for a, b in pairs.values():
        a.close()
        b.close()


_ids = iter(range(1, 1 << 30))


def _layers(num_layers=4, nbytes=64 * 1024):
    return [np.random.default_rng(i).integers(0, 255, nbytes, dtype=np.uint8) for i in range(num_layers)]


def _transfer(sender_agent, receiver_agent, layers, *, checksum=False, timeout_s=5.0, send_layout=None,
              trailer=b"trailer-bytes"):
    layout = TransferLayout(next(_ids), tuple(x.nbytes for x in layers))
    dest = np.zeros(layout.total_nbytes, dtype=np.uint8)
    rx = receiver_agent.create_receiver(layout, memoryview(dest), timeout_s)
    tx = sender_agent.create_sender(receiver_agent.address(), send_layout or layout, timeout_s, checksum)
    for i, buf in enumerate(layers):
        tx.send_layer(i, memoryview(buf))
    tx.finish(trailer)
    assert wait_until(lambda: rx.poll() in _ENDED and tx.poll() in _ENDED, timeout_s + 5)
    return rx, tx, dest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("checksum,num_layers,nbytes", [(False, 4, 64 * 1024), (True, 4, 64 * 1024),
                                                        (True, 64, 24 * 1024)])
def test_layers_arrive_intact(agent_pairs, backend, checksum, num_layers, nbytes):
    """Many layers: a receiver takes a layer while earlier ones are still being received."""
    a, b = agent_pairs[backend]
    layers = _layers(num_layers, nbytes)
    rx, tx, dest = _transfer(a, b, layers, checksum=checksum)
    assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
    assert np.array_equal(dest, np.concatenate(layers))
    assert rx.trailer == b"trailer-bytes"
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("checksum", [False, True])
def test_an_empty_trailer_arrives(agent_pairs, backend, checksum):
    """Without frames (UCX, no checksum) the trailer is a message of its own even when empty."""
    a, b = agent_pairs[backend]
    layers = _layers(num_layers=3, nbytes=4096)
    rx, tx, dest = _transfer(a, b, layers, checksum=checksum, trailer=b"")
    assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
    assert rx.trailer == b"" and np.array_equal(dest, np.concatenate(layers))
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("frameless", [True, False], ids=["frameless", "framed-as-earlier-releases"])
def test_ucx_sends_no_layer_frames_without_a_checksum_and_takes_framed_transfers_too(
        agent_pairs, monkeypatch, frameless):
    """A layer's frame carries only its CRC beyond what the tag and probed length say, so without a
    checksum each layer is one message; a receiver still takes a sender that frames every layer."""
    a, b = agent_pairs["ucx"]
    sent = []
    real_send = a.post_send
    monkeypatch.setattr(a, "post_send", lambda ep, buf, buf_tag: (sent.append(buf_tag), real_send(ep, buf, buf_tag))[1])
    monkeypatch.setattr(a, "frameless_sends", frameless)
    layers = _layers(num_layers=4, nbytes=8192)
    rx, tx, dest = _transfer(a, b, layers)
    assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
    assert np.array_equal(dest, np.concatenate(layers)) and rx.trailer == b"trailer-bytes"
    # Per layer a payload (and its frame), the trailer (and its frame), the header.
    assert len(sent) == (1 + 4 + 1 if frameless else 1 + 2 * 4 + 2)
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trailer_larger_than_a_control_frame_arrives_intact(agent_pairs, backend):
    """Prompt logprobs make the trailer large (a fuzzed request found UCX refusing 1063 bytes)."""
    a, b = agent_pairs[backend]
    layers = _layers(num_layers=2, nbytes=4096)
    trailer = np.random.default_rng(7).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    layout = TransferLayout(next(_ids), tuple(x.nbytes for x in layers), new_token())
    dest = np.zeros(layout.total_nbytes, dtype=np.uint8)
    rx = b.create_receiver(layout, memoryview(dest), 10.0)
    tx = a.create_sender(b.address(), layout, 10.0)
    for i, buf in enumerate(layers):
        tx.send_layer(i, memoryview(buf))
    tx.finish(trailer)
    assert wait_until(lambda: rx.poll() in _ENDED and tx.poll() in _ENDED, 12)
    assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
    assert rx.trailer == trailer and np.array_equal(dest, np.concatenate(layers))
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault,needs_checksum,expected", [
    (Faults(truncate_layers=frozenset({1})), False, "bytes"),
    (Faults(truncate_layers=frozenset({3})), False, "bytes"),    # after three layers in flight
    (Faults(corrupt_layers=frozenset({2})), True, "checksum mismatch"),
    (Faults(drop_layers=frozenset({0})), False, ""),
])
def test_bad_messages_fail_both_sides_with_a_reason(agent_pairs, backend, fault, needs_checksum, expected):
    a, b = agent_pairs[backend]
    rx, tx, _ = _transfer(FaultyAgent(a, fault), b, _layers(), checksum=needs_checksum)
    assert rx.poll() is TransferState.FAILED and expected in (rx.failure() or "")
    assert tx.poll() is TransferState.FAILED and tx.failure()
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vanished_sender_times_out_receiver(agent_pairs, backend):
    a, b = agent_pairs[backend]
    rx, tx, _ = _transfer(FaultyAgent(a, Faults(vanish_after_layers=2)), b, _layers(), timeout_s=1.0)
    assert rx.poll() is TransferState.FAILED
    assert "timed out" in rx.failure() or "closed" in rx.failure()
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_transfer_id_is_refused(agent_pairs, backend):
    a, b = agent_pairs[backend]
    layout = TransferLayout(next(_ids), (1024,))
    tx = a.create_sender(b.address(), layout, 5.0)
    tx.send_layer(0, memoryview(bytearray(1024)))
    tx.finish(b"")
    assert wait_until(lambda: tx.poll() in _ENDED, 6)
    assert tx.poll() is TransferState.FAILED and "unknown" in tx.failure()
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_is_refused(agent_pairs, backend):
    a, b = agent_pairs[backend]
    layers = _layers(num_layers=2)
    rx, tx, _ = _transfer(a, b, layers, send_layout=None)
    assert rx.poll() is TransferState.DONE
    # Sender claims 3 layers where the receiver was armed for 2.
    layout = TransferLayout(next(_ids), (1024, 1024))
    dest = np.zeros(2048, np.uint8)
    rx = b.create_receiver(layout, memoryview(dest), 3.0)
    tx = a.create_sender(b.address(), TransferLayout(layout.transfer_id, (1024, 1024, 1024)), 3.0)
    for i in range(3):
        tx.send_layer(i, memoryview(bytearray(1024)))
    tx.finish(b"")
    assert wait_until(lambda: rx.poll() in _ENDED and tx.poll() in _ENDED, 8)
    assert rx.poll() is TransferState.FAILED and tx.poll() is TransferState.FAILED
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("forged_token", [b"", b"x" * 16], ids=["no-token", "wrong-token"])
def test_a_sender_without_the_token_is_refused_and_the_real_one_completes(agent_pairs, backend, forged_token):
    """Knowing a live transfer's id is not enough: a sender without its token is refused before
    anything reaches the receiver, which then completes with its real sender's bytes."""
    a, b = agent_pairs[backend]
    layers = _layers(num_layers=2, nbytes=4096)
    layout = TransferLayout(next(_ids), tuple(x.nbytes for x in layers), new_token())
    dest = np.zeros(layout.total_nbytes, dtype=np.uint8)
    rx = b.create_receiver(layout, memoryview(dest), 10.0)
    forged = a.create_sender(b.address(), dataclasses.replace(layout, token=forged_token), 5.0)
    for i in range(2):
        forged.send_layer(i, memoryview(bytearray(4096)))
    forged.finish(b"forged")
    assert wait_until(lambda: forged.poll() in _ENDED, 6)
    assert forged.poll() is TransferState.FAILED and "wrong token" in forged.failure(), forged.failure()
    assert rx.poll() is not TransferState.FAILED and rx.num_layers_received == 0
    real = a.create_sender(b.address(), layout, 5.0)
    for i, buf in enumerate(layers):
        real.send_layer(i, memoryview(buf))
    real.finish(b"real")
    assert wait_until(lambda: rx.poll() in _ENDED and real.poll() in _ENDED, 8)
    assert (rx.poll(), real.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), real.failure())
    assert np.array_equal(dest, np.concatenate(layers)) and rx.trailer == b"real"
    assert_no_leaks(agents=(a, b))


def test_tcp_refuses_a_forged_sender_and_the_real_one_still_completes(agent_pairs):
    """A connection presenting an armed transfer id with a header that does not fit is refused
    before it touches the receiver: the transfer's own sender then completes it."""
    a, b = agent_pairs["tcp"]
    layers = _layers(num_layers=2, nbytes=4096)
    layout = TransferLayout(next(_ids), tuple(x.nbytes for x in layers))
    dest = np.zeros(layout.total_nbytes, dtype=np.uint8)
    rx = b.create_receiver(layout, memoryview(dest), 10.0)
    forged = a.create_sender(b.address(), TransferLayout(layout.transfer_id, (4096,)), 5.0)
    forged.send_layer(0, memoryview(bytearray(4096)))
    forged.finish(b"forged")
    assert wait_until(lambda: forged.poll() in _ENDED, 6)
    assert forged.poll() is TransferState.FAILED and "layout mismatch" in forged.failure()
    assert rx.poll() is not TransferState.FAILED
    real = a.create_sender(b.address(), layout, 5.0)
    for i, buf in enumerate(layers):
        real.send_layer(i, memoryview(buf))
    real.finish(b"real")
    assert wait_until(lambda: rx.poll() in _ENDED and real.poll() in _ENDED, 8)
    assert (rx.poll(), real.poll()) == (TransferState.DONE, TransferState.DONE)
    assert np.array_equal(dest, np.concatenate(layers)) and rx.trailer == b"real"
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_from_either_side(agent_pairs, backend):
    a, b = agent_pairs[backend]
    layout = TransferLayout(next(_ids), (4096, 4096))
    rx = b.create_receiver(layout, memoryview(np.zeros(8192, np.uint8)), 5.0)
    tx = a.create_sender(b.address(), layout, 5.0)
    tx.send_layer(0, memoryview(bytearray(4096)))
    tx.abort("client went away")
    assert wait_until(lambda: rx.poll() in _ENDED, 6)
    assert tx.poll() is TransferState.FAILED and "client went away" in tx.failure()
    assert rx.poll() is TransferState.FAILED
    rx2 = b.create_receiver(TransferLayout(next(_ids), (16,)), memoryview(np.zeros(16, np.uint8)), 5.0)
    rx2.abort("decode request cancelled")
    assert rx2.poll() is TransferState.FAILED and "cancelled" in rx2.failure()
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sender_aborted_before_its_first_layer_fails_the_receiver_before_its_deadline(agent_pairs, backend):
    """UCX sends the header after the first layers; a sender aborted before any still announces
    the transfer, so its receiver ends now with the reason instead of waiting out its deadline."""
    a, b = agent_pairs[backend]
    layout = TransferLayout(next(_ids), (4096, 4096))
    rx = b.create_receiver(layout, memoryview(np.zeros(8192, np.uint8)), 60.0)
    tx = a.create_sender(b.address(), layout, 60.0)
    tx.abort("prefill preempted")
    assert wait_until(lambda: rx.poll() in _ENDED, 10)
    assert rx.poll() is TransferState.FAILED and "prefill preempted" in rx.failure()
    assert_no_leaks(agents=(a, b))


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        create_agent("carrier-pigeon", WallClock())


def test_tcp_abort_after_a_failure_leaves_the_refusal_to_the_connection_thread(agent_pairs):
    """The decode worker aborts a receiver as soon as it sees it FAILED; if that abort shut the
    socket down, the connection thread's ERROR frame to the sender was lost (a 1-in-20 flake of
    test_bad_kv_message_fails_cleanly): an abort of an already-ended transfer leaves it alone."""
    import socket

    _, b = agent_pairs["tcp"]
    rx = b.create_receiver(TransferLayout(next(_ids), (16,)), memoryview(np.zeros(16, np.uint8)), 5.0)
    ours, peer = socket.socketpair()
    try:
        assert rx.attach(ours)
        assert rx.status.mark_failed("checksum mismatch in layer 0")   # what the connection thread does
        rx.abort("decode request failed")                               # what the worker then does
        ours.sendall(b"ERROR frame")                                    # the thread can still answer
        assert peer.recv(64) == b"ERROR frame"
        assert rx.failure() == "checksum mismatch in layer 0"
    finally:
        ours.close()
        peer.close()
    assert_no_leaks(agents=(b,))


@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_a_malformed_peer_address_is_refused_before_it_reaches_the_backend(agent_pairs, backend):
    """UCX aborts the whole process on a worker address of another format version (found by
    hand while fixing a fuzzed TCP address): such addresses never reach it."""
    a, b = agent_pairs[backend]
    other_version = bytes([b.address()[0] ^ 0x47]) + b.address()[1:]
    for bad in (b"", b"garbage" * 10, *([other_version] if backend == "ucx" else [b"127.0.0.1:99999"])):
        assert a.check_peer_address(bad), bad
        tx = a.create_sender(bad, TransferLayout(next(_ids), (16,)), 2.0) if backend == "ucx" else None
        if tx is not None:
            assert wait_until(lambda: tx.poll() in _ENDED, 4)
            assert tx.poll() is TransferState.FAILED and "UCX worker address" in tx.failure()
    assert a.check_peer_address(b.address()) is None
    assert_no_leaks(agents=(a, b))


@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_transfers_sent_from_many_threads_at_once_arrive_intact(agent_pairs, backend):
    """A UCX sender posts from its caller's thread while the agent's thread progresses the same
    worker (ucxx makes it thread-safe): eight threads, each streaming transfers layer by layer,
    against one receiving agent."""
    a, b = agent_pairs[backend]
    results, errors = [], []

    def stream(seed: int) -> None:
        try:
            for _ in range(5):
                layers = [np.random.default_rng(seed * 100 + i).integers(0, 255, 8192 * (i + 1), dtype=np.uint8)
                          for i in range(6)]
                results.append((layers, *_transfer(a, b, layers, trailer=bytes([seed]))))
        except Exception as exc:  # surfaced below, with the thread that raised it
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(results) == 40
    for layers, rx, tx, dest in results:
        assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
        assert np.array_equal(dest, np.concatenate(layers)) and len(rx.trailer) == 1
    assert_no_leaks(agents=(a, b))
