"""The prefill side's lazy KV sender: once its request has ended, a layer the compute thread
finishes afterwards (the operator was already running when the client left) creates no sender.
Such a sender would wait for layers that never come until its deadline, and the worker would
count it as an active transfer that long (tests/faults/test_disconnects.py caught it).
Layers go out in groups of at least `group_bytes` while the prefill runs, the rest at `flush()`;
the worker's real path (real backends, grouped by the default size) runs in the integration tests."""
import torch

from pdserve.kvtransfer import TransferLayout
from pdserve.workers.prefill_side import _LazySender


class _Agent:
    """Records sender creation; the real backends are tested in tests/unit/kvtransfer."""

    def __init__(self):
        self.created = []

    def create_sender(self, *args):
        self.created.append(args)
        return _Sender()


class _Sender:
    def __init__(self):
        self.layers, self.aborted = [], None

    def send_layer(self, layer, view):
        self.layers.append(layer)

    def poll(self):
        from pdserve.kvtransfer import TransferState
        return TransferState.TRANSFERRING if self.aborted is None else TransferState.FAILED

    def abort(self, reason):
        self.aborted = reason


def _link(agent, num_layers=2, group_bytes=0):
    return _LazySender(agent, b"peer", TransferLayout(1, (64,) * num_layers), 5.0, False, group_bytes=group_bytes)


def _layer():
    return torch.zeros(2, 2, 1, 4)      # 64 bytes


def test_a_layer_finished_after_the_request_ended_creates_no_sender():
    agent = _Agent()
    link = _link(agent)
    link.abort_if_active("client went away")            # the request ended before its first layer
    link.send_layer(0, torch.zeros(2, 2, 1, 4))
    assert agent.created == [] and link.kv_bytes == 0


def test_a_running_sender_is_aborted_and_gets_nothing_more():
    agent = _Agent()
    link = _link(agent)
    link.send_layer(0, torch.zeros(2, 2, 1, 4))
    link.abort_if_active("client went away")
    link.send_layer(1, torch.zeros(2, 2, 1, 4))
    [sender_args] = agent.created
    assert link.get().layers == [0] and link.get().aborted == "client went away"


def test_layers_go_in_groups_of_at_least_group_bytes_and_flush_sends_the_rest():
    agent = _Agent()
    link = _link(agent, num_layers=5, group_bytes=128)
    link.send_layer(0, _layer())
    assert agent.created == [] and link.kv_bytes == 0      # held: no sender yet
    link.send_layer(1, _layer())
    assert link.get().layers == [0, 1] and link.kv_bytes == 128
    for layer in (2, 3, 4):
        link.send_layer(layer, _layer())
    assert link.get().layers == [0, 1, 2, 3]               # the last layer waits for the prefill's end
    link.flush()
    link.flush()                                           # nothing held: nothing sent twice
    assert link.get().layers == [0, 1, 2, 3, 4] and link.kv_bytes == 5 * 64
    assert len(agent.created) == 1


def test_without_a_group_size_every_layer_goes_at_once():
    agent = _Agent()
    link = _link(agent, num_layers=3)
    link.send_layer(0, _layer())
    assert link.get().layers == [0]


def test_held_layers_of_an_ended_request_are_dropped():
    agent = _Agent()
    link = _link(agent, num_layers=2, group_bytes=1 << 20)
    link.send_layer(0, _layer())
    link.send_layer(1, _layer())
    link.abort_if_active("client went away")
    link.flush()
    assert agent.created == [] and link.kv_bytes == 0
