"""IC-Cache wired from the configuration for the gateway process, and its replay loop."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from pdserve.clock import UnixClock
from pdserve.config import PDServeConfig
from pdserve.iccache.service import ICCacheService
from pdserve.policy.iccache.bandit import BanditConfig, ModelChooser
from pdserve.policy.iccache.examples import CacheConfig, ExampleCache
from pdserve.policy.iccache.selection import ExampleSelector, SelectionConfig
from pdserve.store import Store
from pdserve.store.iccache import ICCacheRepository

log = logging.getLogger("pdserve.iccache")


async def build(cfg: PDServeConfig, store: Store) -> ICCacheService:
    from pdserve.iccache.embedder import MiniLMEmbedder
    ic = cfg.iccache
    embedder = await asyncio.to_thread(MiniLMEmbedder, ic.embedder_threads)
    svc = ICCacheService(ICCacheRepository(store), embedder, cfg.served_model, ic.small_model, UnixClock(),
                         ExampleCache(CacheConfig(capacity_bytes=ic.capacity_bytes)),
                         ExampleSelector(SelectionConfig(min_similarity=ic.min_similarity,
                                                         max_examples=ic.max_examples)),
                         ModelChooser(BanditConfig(load_penalty_l0=ic.load_penalty, cost_small=ic.small_cost), seed=ic.seed),
                         num_candidates=ic.num_candidates, text_preamble=ic.text_preamble,
                         full_load_requests=ic.full_load_requests,
                         share_examples_across_tenants=ic.share_examples_across_tenants)
    await svc.load()
    return svc


async def replay_loop(svc: ICCacheService, large_load: Callable[[], Awaitable[float]],
                      ask_large: Callable[[str], Awaitable[str]], interval_s: float, max_load: float) -> None:
    """Runs until cancelled: one replay per interval, only while the large pool has room."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await large_load() < max_load:
                outcome = await svc.replay_step(ask_large)
                if outcome is not None:
                    log.info("IC-Cache replay: %s", outcome)
        except Exception:   # a failed replay costs nothing but itself; the loop must live on
            log.exception("IC-Cache replay failed")
