"""The tcp backend keeps connections open between transfers: later transfers to the same peer
reuse them, a connection the peer closed or a transfer failed on is never reused, and closing an
agent ends every connection thread."""
import threading

import numpy as np
import pytest

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState
from pdserve.kvtransfer.backends.tcp import TcpAgent
from tests.conftest import assert_no_leaks, wait_until

_ENDED = (TransferState.DONE, TransferState.FAILED)
_ids = iter(range(1, 1 << 30))


@pytest.fixture
def pair():
    a, b = TcpAgent(WallClock(), "127.0.0.1"), TcpAgent(WallClock(), "127.0.0.1", stall_timeout_s=2.0)
    yield a, b
    a.close()
    b.close()


def _arm(receiver_agent, nbytes=(4096, 4096)):
    layout = TransferLayout(next(_ids), nbytes)
    dest = np.zeros(layout.total_nbytes, np.uint8)
    return layout, dest, receiver_agent.create_receiver(layout, memoryview(dest), 5.0)


def _send(sender_agent, receiver_agent, layout, fill: int, tx=None):
    tx = tx or sender_agent.create_sender(receiver_agent.address(), layout, 5.0, checksum=True)
    for i, n in enumerate(layout.layer_nbytes):
        tx.send_layer(i, memoryview(np.full(n, fill + i, np.uint8)))
    tx.finish(b"t%d" % fill)
    return tx


def _transfer(a, b, fill: int):
    layout, dest, rx = _arm(b)
    tx = _send(a, b, layout, fill)
    assert wait_until(lambda: rx.poll() in _ENDED and tx.poll() in _ENDED, 8)
    assert (rx.poll(), tx.poll()) == (TransferState.DONE, TransferState.DONE), (rx.failure(), tx.failure())
    assert dest[0] == fill and dest[-1] == fill + 1 and rx.trailer == b"t%d" % fill


def _idle_connections(agent: TcpAgent) -> list:
    with agent._lock:
        return list(agent._idle)


def _transfer_then_idle(a, b, fill: int) -> None:
    _transfer(a, b, fill)
    assert wait_until(lambda: len(_idle_connections(a)) == 1, 5)   # back in the pool after the ACK


def _completes_on_a_new_connection(a, b) -> None:
    _transfer(a, b, 2)
    assert a.num_connections_opened == 2
    assert_no_leaks(agents=(a, b))


def test_later_transfers_reuse_the_connection(pair):
    a, b = pair
    for fill in range(5):
        _transfer_then_idle(a, b, fill)
    assert a.num_connections_opened == 1
    assert_no_leaks(agents=(a, b))


def test_concurrent_transfers_to_one_peer_use_separate_connections(pair):
    a, b = pair
    armed = [_arm(b) for _ in range(3)]
    # All three start before any ends: none can find another's connection back in the pool.
    started = [a.create_sender(b.address(), layout, 5.0, checksum=True) for layout, _, _ in armed]
    senders = [_send(a, b, layout, 10 * i, tx) for i, ((layout, _, _), tx) in enumerate(zip(armed, started))]
    assert wait_until(lambda: all(t.poll() in _ENDED for t in senders) and all(r.poll() in _ENDED for *_, r in armed), 8)
    assert all(t.poll() is TransferState.DONE for t in senders), [t.failure() for t in senders]
    for i, (_, dest, rx) in enumerate(armed):
        assert rx.poll() is TransferState.DONE and dest[0] == 10 * i and rx.trailer == b"t%d" % (10 * i)
    assert a.num_connections_opened == 3
    assert_no_leaks(agents=(a, b))


def test_a_connection_the_peer_closed_is_replaced_not_reused(pair):
    a, b = pair
    _transfer_then_idle(a, b, 1)
    with b._lock:
        served = list(b._served)
    for sock in served:          # what a restarting or overloaded peer does to an idle connection
        sock.shutdown(2)
    assert wait_until(lambda: not _idle_connections(a)[0].alive(), 5)
    _completes_on_a_new_connection(a, b)


def test_a_failed_transfer_closes_its_connection_and_the_next_one_completes(pair):
    a, b = pair
    _transfer_then_idle(a, b, 1)
    unknown = _send(a, b, TransferLayout(next(_ids), (16,)), 7)     # nothing armed under its id
    assert wait_until(lambda: unknown.poll() in _ENDED, 8)
    assert unknown.poll() is TransferState.FAILED and "unknown or expired transfer id" in unknown.failure()
    assert wait_until(lambda: not _idle_connections(a), 5)
    _completes_on_a_new_connection(a, b)


def test_an_aborted_transfer_is_not_followed_on_its_connection(pair):
    a, b = pair
    layout, _, rx = _arm(b)
    tx = a.create_sender(b.address(), layout, 5.0)
    tx.send_layer(0, memoryview(np.zeros(4096, np.uint8)))
    tx.abort("client went away")
    assert wait_until(lambda: rx.poll() in _ENDED, 6) and rx.poll() is TransferState.FAILED
    _completes_on_a_new_connection(a, b)


def test_close_ends_every_connection_thread():
    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name in ("kv-tcp-send", "kv-tcp-recv")}
    before = ours()
    a, b = TcpAgent(WallClock(), "127.0.0.1"), TcpAgent(WallClock(), "127.0.0.1")
    _transfer(a, b, 1)
    _transfer(b, a, 2)
    assert len(ours() - before) == 4        # one sending and one receiving thread per direction
    a.close()
    b.close()
    assert wait_until(lambda: not (ours() - before), 5), ours() - before


def test_liveness_is_read_right_past_selects_descriptor_limit(pair):
    """A busy worker holds many descriptors: an idle connection numbered past 1024 (select's
    limit) must still be found alive, and found dead once its peer closes it."""
    import os
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 2000:
        pytest.skip(f"descriptor limit {hard} leaves no room past 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    a, b = pair
    try:
        _transfer_then_idle(a, b, 1)
        conn = _idle_connections(a)[0]
        low = conn.sock
        conn.sock = socket.socket(fileno=os.dup2(low.fileno(), 2000))
        low.close()
        assert conn.alive()
        with b._lock:
            served = list(b._served)
        for sock in served:
            sock.shutdown(2)
        assert wait_until(lambda: not conn.alive(), 5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
