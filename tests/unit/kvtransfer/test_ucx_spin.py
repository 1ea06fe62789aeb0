"""The UCX agent's spin: transfers arrive intact with it off or long, and an agent whose transfers
have ended sleeps between its ticks however long its spin is."""
import numpy as np
import pytest

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState, create_agent
from pdserve.kvtransfer.backends._ucx_engine import IDLE_TICK_S
from tests.conftest import wait_until


def _move(a, b, transfer_id: int) -> None:
    layers = [np.full(256 * 1024, i + 1, dtype=np.uint8) for i in range(3)]
    layout = TransferLayout(transfer_id, tuple(x.nbytes for x in layers))
    dest = np.zeros(layout.total_nbytes, dtype=np.uint8)
    rx = b.create_receiver(layout, memoryview(dest), 10.0)
    tx = a.create_sender(b.address(), layout, 10.0)
    for i, buf in enumerate(layers):
        tx.send_layer(i, memoryview(buf))
    tx.finish(b"t")
    assert wait_until(lambda: rx.poll() is TransferState.DONE and tx.poll() is TransferState.DONE, 15)
    assert np.array_equal(dest, np.concatenate(layers))


@pytest.mark.parametrize("spin_s", [0.0, 0.01])
def test_a_transfer_arrives_intact_with_any_spin(spin_s):
    a, b = (create_agent("ucx", WallClock(), spin_s=spin_s) for _ in range(2))
    try:
        _move(a, b, 7)
        _move(b, a, 8)
    finally:
        a.close()
        b.close()


def test_an_agent_without_open_transfers_does_not_spin():
    a, b = (create_agent("ucx", WallClock(), spin_s=5.0) for _ in range(2))
    try:
        _move(a, b, 9)              # both loops just moved: only an open transfer may keep them spinning
        assert wait_until(lambda: a.num_active_transfers() == 0 and b.num_active_transfers() == 0, 10)
        # Ticks, not time: over 3 idle ticks a spinning loop turns thousands of times.
        for engine in (a.engine, b.engine):
            start = engine.turns
            assert wait_until(lambda: engine.turns >= start + 3, 20 * IDLE_TICK_S + 10)
            turned = engine.turns - start
            assert turned < 50, f"{turned} turns: the loop spins with no transfer open"
    finally:
        a.close()
        b.close()
