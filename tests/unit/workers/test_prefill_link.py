"""The prefill side's lazy KV sender: once its request has ended, a layer the compute thread
finishes afterwards (the operator was already running when the client left) creates no sender.
Such a sender would wait for layers that never come until its deadline, and the worker would
count it as an active transfer that long (tests/faults/test_disconnects.py caught it)."""
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


def _link(agent):
    return _LazySender(agent, b"peer", TransferLayout(1, (64, 64)), 5.0, False)


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
