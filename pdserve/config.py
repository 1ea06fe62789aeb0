"""The one typed configuration: YAML file, then PDSERVE_* environment variables on top.

Nested fields are addressed with double underscores: PDSERVE_KVTRANSFER__BACKENDS='["tcp"]',
PDSERVE_WORKER__PORT=9000. Only this module reads the environment.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pdserve.cluster_auth import ClusterCredential, TlsMaterial

ENV_PREFIX = "PDSERVE_"
CONFIG_ENV = "PDSERVE_CONFIG"   # path of the YAML file when --config is not given


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    name: str = Field("tiny", description="'tiny', 'tiny-large' (random weights, byte tokenizer), 'smollm2-135m' "
                      "or a local Hugging Face Llama directory")
    cache_dir: pathlib.Path = Field(
        pathlib.Path.home() / ".cache" / "pdserve",
        description="Where converted model weights are cached (the GGUF is dequantised once)")
    torch_num_threads: int = Field(0, ge=0, description="torch intra-op threads; 0: for a worker started alone, "
                                   "half the CPUs it may use (its affinity capped by its cgroup CPU quota: "
                                   "its two compute threads each run a team), for each worker `pdserve up` "
                                   "starts an even share of the cores")


class KVTransferSettings(_Section):
    backends: list[Literal["ucx", "tcp", "fake"]] = Field(
        ["ucx", "tcp"], description="Backends this worker serves; a sender picks one by name")
    host: str = Field("127.0.0.1", description="Address the tcp backend listens on")
    tcp_port: int = Field(0, ge=0, le=65535, description="tcp backend port; 0 picks a free one")
    ucx_tls: str = Field("tcp,sm,self", description="UCX transports; sm gives shared memory on one host")
    ucx_spin_us: float = Field(
        50.0, ge=0, le=10_000, description="While a transfer is open, the UCX agent's thread keeps polling this "
        "long after its last event before it sleeps (saves a thread wake-up per message; 0: sleep at once)")
    send_group_bytes: int = Field(
        1 << 20, ge=0, description="While it computes, a prefill worker sends finished layers in groups of at least "
        "this many bytes, the rest once the prefill is done: a smaller layer's transfer is shorter than a send's "
        "fixed cost, so streaming it alone delays the first token; 0 sends every layer as it finishes")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one whole transfer")
    stall_timeout_s: float = Field(10.0, gt=0, description="Longest silence from a peer mid-transfer")
    checksum: bool = Field(False, description="CRC32 every layer (costs ~1 GB/s of CPU per core)")


class WorkerSettings(_Section):
    role: Literal["prefill", "decode", "aggregated"] = Field("aggregated", description="Initial role")
    worker_id: str = Field("", description="Stable id; empty derives one from host and port")
    host: str = Field("127.0.0.1", description="gRPC listen address")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    num_kv_blocks: int = Field(512, gt=0, description="Paged KV blocks in the decode pool")
    block_size_tokens: int = Field(16, gt=0, description="Tokens per KV block")
    prefix_caching: bool = Field(True, description="Keep full prompt blocks for reuse by later prompts sharing "
                                 "the prefix (cached blocks are evicted LRU when the pool needs room)")
    max_batch_size: int = Field(32, gt=0, description="Most sequences in one decode step")
    reservation_lease_s: float = Field(30.0, gt=0,
                                       description="A KV reservation with no Generate call is freed after this")
    scenario: str = Field("default", description="Scenario (worker group) this worker serves")
    prefill_scheduler: Literal["fcfs", "chunked", "flowprefill"] = Field(
        "flowprefill", description="Prefill scheduling: naive FCFS, fixed-chunk (vLLM/Sarathi) or FlowPrefill")
    chunk_size_tokens: int = Field(512, gt=0, description="Token budget of one step in chunked mode")
    batch_budget_tokens: int = Field(512, gt=0, description="FlowPrefill batches short prompts up to this")
    default_ttft_slo_ms: float = Field(2000.0, gt=0, description="TTFT deadline when a request names none")
    router_address: str = Field("", description="host:port of the router to register with; empty: standalone")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM: after deregistering, how long in-flight requests may take to finish")
    advertise_host: str = Field("", description="Host other components use to reach this worker; empty: host")
    max_queued_prefills: int = Field(
        256, gt=0, description="Prompts waiting in the prefill scheduler; more are refused (RESOURCE_EXHAUSTED)")
    max_prefill_wait_s: float = Field(
        30.0, gt=0, description="A prompt without a TTFT SLO predicted to finish later than this is refused")
    max_concurrent_rpcs: int = Field(1024, gt=0, description="gRPC calls served at once; more are refused")


class RouterSettings(_Section):
    host: str = Field("127.0.0.1", description="Router gRPC listen address")
    port: int = Field(50050, ge=0, le=65535, description="Router gRPC port; 0 picks a free one")
    lease_s: float = Field(6.0, gt=0, description="A worker silent for this long is marked dead")
    request_timeout_s: float = Field(600.0, gt=0, description="Deadline of one request end to end")
    max_migrations: int = Field(3, ge=0, description="Times one request may move to other workers after failures")
    decode_stall_timeout_s: float = Field(
        10.0, gt=0, description="A stream with no token for this long (after its first) counts as a failed worker")
    max_inflight_requests: int = Field(
        512, gt=0, description="Requests routed at once; more are refused at once (RESOURCE_EXHAUSTED -> 429)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM: how long running requests may finish")
    kv_backend_preference: list[Literal["ucx", "tcp", "fake"]] = Field(
        ["ucx", "tcp"], description="First backend both workers serve is used for a transfer")
    admin_token: str = Field("", description="Bearer token of the gRPC Admin API; empty disables it")
    cache_aware_routing: bool = Field(True, description="Place requests where their prompt prefix is cached "
                                      "(index fed by the workers' heartbeats), weighed against load")
    cache_load_tokens_per_request: float = Field(
        512.0, ge=0, description="Cache-aware routing: a request in flight on a worker costs like this many "
        "uncached prompt tokens")
    local_prefill_max_tokens: int = Field(
        0, ge=0, description="Conditional disaggregation (with cache_aware_routing): a request whose decode worker "
        "caches all of its prompt but at most this many tokens is prefilled there, skipping the prefill worker and "
        "the KV transfer; 0 always uses a prefill worker")
    control_interval_s: float = Field(5.0, gt=0, description="How often the P/D ratio controller decides")
    ratio_window_s: float = Field(60.0, gt=0, description="Traffic window the ratio controller models")
    ratio_cooldown_s: float = Field(30.0, ge=0, description="Least time between two ratio changes")
    ratio_hysteresis: float = Field(0.2, ge=0, lt=1,
                                    description="Relative utilisation gap below which the ratio stays put")
    ratio_min_utilisation: float = Field(
        0.05, ge=0, lt=1, description="No ratio change while both roles are less busy than this (modelled demand "
        "over the role's workers): the split does not matter then, and the estimates are mostly noise")


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="HTTP listen address")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    router_address: str = Field("127.0.0.1:50050", description="host:port of the router")
    embedded_router: bool = Field(
        False, description="Run the router in the gateway's process (small deployments): requests skip one gRPC "
                           "hop; workers and admins reach the router at router.host:router.port as usual")
    model: str = Field("", description="Model name served; empty uses model.name")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies get HTTP 413")
    max_tokens_limit: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for")
    require_api_key: bool = Field(False, description="Reject requests without a valid bearer API key")
    allow_anonymous: bool = Field(
        False, description="Serve a non-loopback address without API keys (otherwise the gateway refuses to start)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    max_inflight_requests: int = Field(
        512, gt=0, description="Completions served at once; more get 429 with Retry-After at once")
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM: how long open responses may finish")
    tls_cert_file: str = Field("", description="PEM certificate (chain): serve HTTPS instead of HTTP")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _tls_pair(self):
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("gateway.tls_cert_file and gateway.tls_key_file go together: set both or neither")
        return self


class ClusterSettings(_Section):
    secret: SecretStr = Field(SecretStr(""), description=(
        "Shared secret every Router and Worker call carries; give it as PDSERVE_CLUSTER__SECRET or in "
        "secret_file, never on a command line. Required to listen on a non-loopback address"))
    secret_file: str = Field("", description="File holding the cluster secret (e.g. a mounted Kubernetes Secret)")
    tls_ca_file: str = Field("", description=(
        "Mutual TLS between components: PEM of the cluster CA; peers must present a certificate it "
        "signed (make a development set with `pdserve certs`)"))
    tls_cert_file: str = Field("", description="Mutual TLS: this component's PEM certificate")
    tls_key_file: str = Field("", description="Mutual TLS: this component's PEM private key")
    tls_server_name: str = Field("", description=(
        "Mutual TLS: name every peer certificate is checked against instead of the dialled host "
        "(`pdserve certs` puts pdserve-cluster in every certificate); empty checks the host"))

    @model_validator(mode="after")
    def _tls_complete(self):
        given = [bool(self.tls_ca_file), bool(self.tls_cert_file), bool(self.tls_key_file)]
        if any(given) and not all(given):
            raise ValueError("cluster.tls_ca_file, tls_cert_file and tls_key_file go together: set all three or none")
        return self

    @field_validator("secret", mode="before")
    @classmethod
    def _as_text(cls, v):
        return v if isinstance(v, SecretStr) else SecretStr(str(v))   # env values may parse as numbers


class ICCacheSettings(_Section):
    enabled: bool = Field(False, description="Serve the routed model name with IC-Cache: a small model plus "
                          "cached large-model answers as examples, when a learned policy expects that to do")
    routed_model: str = Field("auto", description="Model name clients ask for to let IC-Cache choose")
    small_model: str = Field("", description="The small model's name (its workers register with the router; its "
                             "tokenizer may differ). The served model is the large one")
    capacity_bytes: int = Field(64 << 20, gt=0, description="Example cache size; value-per-byte eviction beyond it")
    max_examples: int = Field(3, ge=1, description="Most examples placed before one request")
    min_similarity: float = Field(0.5, ge=-1, le=1, description="Cosine similarity an example needs to be considered")
    num_candidates: int = Field(16, gt=0, description="Nearest examples the selector scores per request")
    load_penalty: float = Field(0.5, ge=0, description="l0: quality a fully loaded pool's arm gives up")
    replay_interval_s: float = Field(30.0, gt=0, description="How often replay may re-ask the large model")
    replay_max_load: float = Field(0.5, ge=0, le=1, description="Replay runs only while the large pool is below this load")
    seed: int = Field(0, description="Seed of the bandit's sampling")
    small_cost: float = Field(0.2, gt=0, description="A small-model request's cost relative to a large one's "
                              "(C in the load penalty); measure it for the pair served")
    full_load_requests: int = Field(32, gt=0, description="Requests in flight on one worker that make it fully "
                                    "loaded for the load penalty (KV use counts too: the higher one)")
    embedder_threads: int = Field(1, ge=1, description="Torch threads of the gateway process, which runs the "
                                  "sentence embedder: one query's embedding gains little from more, and each "
                                  "extra thread spins on a core the workers may need")
    text_preamble: str = Field("", description="Text placed before every routed text prompt, on both arms "
                               "(fixed demonstrations of the answer format, for base models)")
    share_examples_across_tenants: bool = Field(False, description="Show one API key tenant's cached answers to "
                                                "other tenants' requests (one shared cache, as when every tenant is "
                                                "one organisation). Off: each tenant's requests see only examples "
                                                "made from its own requests")

    @model_validator(mode="after")
    def _small_model_named(self):
        if self.enabled and not self.small_model:
            raise ValueError("iccache.enabled needs iccache.small_model (the model that answers with examples)")
        return self


class DatabaseSettings(_Section):
    url: str = Field("", description="SQLAlchemy URL; empty is a SQLite file in model.cache_dir "
                                     "(postgresql+psycopg://user@host/db for production)")


class DiagnosticsSettings(_Section):
    timeline_file: str = Field("", description="Append each request's stages (wall time, process, stage, id) "
                                               "here; for latency work (`pdserve bench timeline`), off when empty")
    decode_pause_file: str = Field("", description="Fault hook for tests: while this file exists a worker's decode "
                                                   "loop takes no step (requests stay in flight after their first "
                                                   "token); off when empty")


class PDServeConfig(_Section):
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    kvtransfer: KVTransferSettings = KVTransferSettings()
    router: RouterSettings = RouterSettings()
    gateway: GatewaySettings = GatewaySettings()
    database: DatabaseSettings = DatabaseSettings()
    cluster: ClusterSettings = ClusterSettings()
    iccache: ICCacheSettings = ICCacheSettings()
    diagnostics: DiagnosticsSettings = DiagnosticsSettings()

    @property
    def served_model(self) -> str:
        return self.gateway.model or self.model.name

    @property
    def cluster_secret(self) -> str:
        """The secret itself, from the file when one is named (read at each call: a rotated
        Kubernetes Secret is picked up on the component's next start)."""
        if self.cluster.secret_file:
            return pathlib.Path(self.cluster.secret_file).read_text().strip()
        return self.cluster.secret.get_secret_value()

    @property
    def cluster_credential(self) -> ClusterCredential:
        """The secret and, when configured, the mutual TLS material (files read at each call)."""
        c = self.cluster
        tls = None
        if c.tls_ca_file:
            read = lambda name: pathlib.Path(name).read_bytes()  # noqa: E731
            tls = TlsMaterial(read(c.tls_ca_file), read(c.tls_cert_file), read(c.tls_key_file), c.tls_server_name)
        return ClusterCredential(self.cluster_secret, tls)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.model.cache_dir / 'pdserve.db'}"


def _set_path(tree: dict, path: list[str], value: str) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    try:
        tree[path[-1]] = json.loads(value)
    except json.JSONDecodeError:
        tree[path[-1]] = value  # plain strings need no JSON quoting


def load_config(path: pathlib.Path | None = None, environ: dict[str, str] | None = None,
                overrides: dict | None = None) -> PDServeConfig:
    data: dict = {}
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = pathlib.Path(env[CONFIG_ENV])
    if path is not None:
        data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            _set_path(data, key[len(ENV_PREFIX):].lower().split("__"), value)
    for dotted, value in (overrides or {}).items():
        tree = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[leaf] = value
    return PDServeConfig.model_validate(data)
