"""What a restarted router takes back from the store: pinned ratios, operator drains and each
scenario's cooldown. Worker roles need nothing here: workers keep their role and re-register
with it (within a heartbeat interval of the router coming back). A role switch cut short by
the restart is left undone; the controller decides it again once the cooldown allows."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from pdserve.policy.ratio_controller import RatioController
from pdserve.store import Store

log = logging.getLogger("pdserve.router")


@dataclass(frozen=True)
class OperatorState:
    pins: dict[str, tuple[int, int]]
    drained: set[str]
    last_change_at: dict[str, dt.datetime]


def load_operator_state(store: Store) -> OperatorState:
    """Blocking: run in a thread."""
    return OperatorState(store.pins(), store.drained_workers(), store.last_ratio_change_at())


def apply_operator_state(state: OperatorState, controller: RatioController, now_s: float) -> None:
    """Pins and cooldowns into the controller; `now_s` is the controller's clock, the store keeps
    wall-clock times, so each change's age is carried over."""
    wall_now = dt.datetime.now(dt.timezone.utc)
    for scenario, (num_prefill, num_decode) in state.pins.items():
        controller.pin(scenario, num_prefill, num_decode)
    for scenario, at in state.last_change_at.items():
        controller.restore_last_change(scenario, now_s - max(0.0, (wall_now - at).total_seconds()))
    if state.pins or state.drained:
        log.info("restored from the store: pinned %s, drained %s", sorted(state.pins) or "none",
                 sorted(state.drained) or "none")
