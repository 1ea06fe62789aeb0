"""Entrypoint of the gateway process: config -> tokenizer, store (migrated), router client ->
uvicorn. Prints `PDSERVE_READY component=gateway port=N` once serving. With
gateway.embedded_router the router runs in this process too (and prints its own READY line
first): requests reach its service by a call instead of a gRPC hop."""
from __future__ import annotations

import asyncio
import logging
import socket
import uuid

import uvicorn

from pdserve.cluster_auth import is_loopback
from pdserve.config import PDServeConfig
from pdserve.gateway.admission import InflightLimit
from pdserve.gateway.app import GatewayDeps, create_app
from pdserve.gateway.dashboard import DashboardAccess
from pdserve.gateway.generation import Limits
from pdserve.gateway.router_client import InProcessRouter, RouterClient
from pdserve.iccache import setup as iccache_setup
from pdserve.iccache.prompting import text_prompt
from pdserve.router import main as router_main
from pdserve.store import Store
from pdserve.v1 import router_pb2, worker_pb2
from pdserve.workers.model.loader import load_tokenizer, model_context_tokens, model_vocab_size

log = logging.getLogger("pdserve.gateway")
_REPLAY_MAX_TOKENS = 256   # an example answer longer than this is cut


async def serve(cfg: PDServeConfig) -> None:
    g = cfg.gateway
    if not is_loopback(g.host) and not g.require_api_key and not g.allow_anonymous:
        raise SystemExit(f"pdserve gateway: refusing to serve {g.host} without API keys; set "
                         "gateway.require_api_key (or gateway.allow_anonymous to serve anyone on purpose)")
    store = Store(cfg.database_url)
    await asyncio.to_thread(store.migrate)
    tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model.name, cfg.model.cache_dir)
    context = await asyncio.to_thread(model_context_tokens, cfg.model.name, cfg.model.cache_dir)
    vocab = await asyncio.to_thread(model_vocab_size, cfg.model.name, cfg.model.cache_dir)
    embedded = await router_main.start(cfg) if g.embedded_router else None
    router = (InProcessRouter(embedded.service, g.retry_after_s) if embedded is not None
              else RouterClient(g.router_address, g.retry_after_s, cfg.cluster_credential))
    ic = cfg.iccache
    extra = await asyncio.to_thread(_extra_models, cfg) if ic.enabled else {}
    limits = Limits(cfg.served_model, context, g.max_tokens_limit, vocab, extra_models=tuple(extra),
                    routed_model=ic.routed_model if ic.enabled else "",
                    extra_model_limits={m: (c, v) for m, (_, c, v) in extra.items()})
    deps = GatewayDeps(router=router, tokenizer=tokenizer, store=store, limits=limits,
                       max_body_bytes=g.max_body_bytes, require_api_key=g.require_api_key,
                       inflight=InflightLimit(g.max_inflight_requests, g.retry_after_s),
                       iccache=await iccache_setup.build(cfg, store) if ic.enabled else None,
                       extra_tokenizers={m: tok for m, (tok, _, _) in extra.items()})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this: without it a response written in two parts (headers, body)
    # waits on the client's delayed ACK, ~40 ms per request on keep-alive connections.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((g.host, g.port))   # bind first so port 0 resolves before we announce it
    access = DashboardAccess(cfg.router.admin_token, is_loopback(g.host))
    app = create_app(deps, dashboard=access)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=g.shutdown_grace_s,
                                           ssl_certfile=g.tls_cert_file or None, ssl_keyfile=g.tls_key_file or None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.05)
    print(f"PDSERVE_READY component=gateway port={sock.getsockname()[1]}", flush=True)
    replay = _start_replay(cfg, deps, app.state.pool_loads) if deps.iccache is not None else None
    try:
        await task   # uvicorn handles SIGTERM/SIGINT: stops accepting, finishes in-flight responses
        # within gateway.shutdown_grace_s
    finally:
        if replay is not None:
            replay.cancel()
        await app.state.recorder.drain()
        await router.close()
        if embedded is not None:    # after uvicorn: responses still open had their router
            await embedded.stop()
        store.engine.dispose()


def _extra_models(cfg: PDServeConfig) -> dict:
    """IC-Cache's small model: its own tokenizer, context length and vocabulary size."""
    name, cache_dir = cfg.iccache.small_model, cfg.model.cache_dir
    return {name: (load_tokenizer(name, cache_dir), model_context_tokens(name, cache_dir),
                   model_vocab_size(name, cache_dir))}


def _start_replay(cfg: PDServeConfig, deps: GatewayDeps, loads) -> asyncio.Task:
    """IC-Cache's replay: re-ask the large model (greedy, through the router like any request)."""
    large = cfg.served_model

    async def large_load() -> float:
        return (await loads.get(deps)).get(large, 1.0)    # no figure: assume busy, replay waits

    async def ask_large(text: str) -> str:
        prompt_ids = deps.tokenizer.encode(text_prompt(text, preamble=cfg.iccache.text_preamble))
        call = deps.router.generate(router_pb2.RouteRequest(
            req_id=f"iccache-replay-{uuid.uuid4().hex[:12]}", model=large, prompt_token_ids=prompt_ids,
            sampling=worker_pb2.SamplingParams(max_tokens=_REPLAY_MAX_TOKENS, temperature=0.0, stop=["\n"])))
        return "".join([chunk.text async for chunk in call]).strip()

    ic = cfg.iccache
    return asyncio.create_task(iccache_setup.replay_loop(deps.iccache, large_load, ask_large, ic.replay_interval_s,
                                                         ic.replay_max_load))
