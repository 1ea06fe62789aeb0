"""A KV sender process that sends a whole transfer with one layer truncated or corrupted, waits for
the receiver's verdict and prints the sender's end state as JSON. A process of its own: the test
process then hosts no UCX agent, whose native state (threads, pinned buffers) outlives `close()`.

Usage: python -m tests.faults.faulty_sender, then one line on stdin:
BACKEND HEX_ADDRESS TRANSFER_ID HEX_TOKEN LAYER_BYTES NUM_LAYERS FAULT CHECKSUM
FAULT: "truncated" (layer 2 cut short) or "corrupted" (layer 1 flipped); CHECKSUM: 0 or 1.
The line comes once the process is up (imports done), so the transfer starts at once: the
receiver's deadlines run from its reservation, and a cold interpreter would eat into them.
"""
import json
import os
import sys
import time

import numpy as np

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState, create_agent
from pdserve.kvtransfer.faults import Faults, FaultyAgent

FAULTS = {"truncated": Faults(truncate_layers=frozenset({2})), "corrupted": Faults(corrupt_layers=frozenset({1}))}


def main() -> None:
    print("ready", flush=True)
    backend, address, transfer_id, token, layer_bytes, num_layers, fault, checksum = sys.stdin.readline().split()
    inner = create_agent(backend, WallClock(), **({"host": "127.0.0.1"} if backend == "tcp" else {}))
    agent = FaultyAgent(inner, FAULTS[fault])
    layout = TransferLayout(int(transfer_id), (int(layer_bytes),) * int(num_layers), bytes.fromhex(token))
    tx = agent.create_sender(bytes.fromhex(address), layout, 5.0, checksum=checksum == "1")
    bufs = [np.ones(n, np.uint8) for n in layout.layer_nbytes]
    for i, buf in enumerate(bufs):
        tx.send_layer(i, memoryview(buf))
    tx.finish(b"")
    deadline = time.monotonic() + 10.0
    while tx.poll() not in (TransferState.DONE, TransferState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"state": tx.poll().name, "failure": tx.failure() or ""}), flush=True)
    os._exit(0)              # no teardown of native UCX state: the kernel reclaims it


if __name__ == "__main__":
    main()
