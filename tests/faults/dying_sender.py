"""A KV sender process that sends some layers of a transfer and then dies without a word.

Usage: python -m tests.faults.dying_sender BACKEND HEX_ADDRESS TRANSFER_ID LAYER_BYTES NUM_LAYERS SEND_LAYERS,
with the transfer's token (hex) as one line on stdin.
"""
import os
import sys
import time

import numpy as np

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, create_agent


def main() -> None:
    backend, address, transfer_id, layer_bytes, num_layers, send_layers = sys.argv[1:7]
    agent = create_agent(backend, WallClock(), **({"host": "127.0.0.1"} if backend == "tcp" else {}))
    token = bytes.fromhex(sys.stdin.readline().strip())
    layout = TransferLayout(int(transfer_id), (int(layer_bytes),) * int(num_layers), token)
    tx = agent.create_sender(bytes.fromhex(address), layout, 30.0)
    bufs = [np.ones(int(layer_bytes), np.uint8) for _ in range(int(send_layers))]
    for i, buf in enumerate(bufs):
        tx.send_layer(i, memoryview(buf))
    time.sleep(0.5)          # let the layers leave
    os._exit(17)             # die mid-transfer: no trailer, no abort, sockets torn down by the kernel


if __name__ == "__main__":
    main()
