"""Open-loop trace replay with Locust: one dispatcher sends each request at its trace time (divided
by --speedup) whether or not earlier ones have finished, each in its own greenlet, streaming, so
TTFT and inter-token times are measured per request. Locust's own statistics (CSV, HTML, web UI)
get one entry per request (name: the scenario); --summary-dir gets summary.json, requests.jsonl
and PNG plots. Works against any OpenAI-compatible /v1/completions endpoint that honours
`ignore_eos` (pdserve, vLLM, SGLang).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --trace azure-conv --speedup 5
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time

import gevent
import gevent.pool
import requests
from locust import User, constant, events, task

from pdserve.loadtest.report import Outcome, plot, summarise
from pdserve.loadtest.workload import DEFAULT_SLOS_MS, TRACE_SETS, PlannedRequest, PromptSynthesizer, Slo, plan

log = logging.getLogger("pdserve.loadtest")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("pdserve trace replay")
    g.add_argument("--trace", default="azure-conv", help=f"built-in workload: {', '.join(TRACE_SETS)}")
    g.add_argument("--trace-file", default="", help="your own trace (Azure CSV, Mooncake JSONL or plain CSV)")
    g.add_argument("--minutes", type=float, default=2.0, help="minutes of trace time replayed")
    g.add_argument("--speedup", type=float, default=1.0, help="replay this many times faster than recorded")
    g.add_argument("--model", default="", help="model name sent (default: the endpoint's first model)")
    g.add_argument("--tokenizer", default="", help="pdserve model name or Hugging Face dir (default: --model)")
    g.add_argument("--max-input-tokens", type=int, default=0, help="clip prompts to this many tokens (0: no clip)")
    g.add_argument("--max-output-tokens", type=int, default=0, help="clip outputs to this many tokens (0: no clip)")
    g.add_argument("--slos", default="", help="per scenario TTFT:TPOT in ms, e.g. conv=1000:50,code=2000:50")
    g.add_argument("--scenario-routing", choices=["header", "key", "none"], default="header",
                   help="header: x-pdserve-scenario; key: API key from $PDSERVE_LOADTEST_KEY_<SCENARIO>")
    g.add_argument("--summary-dir", default="", help="write summary.json, requests.jsonl and plots here")
    g.add_argument("--request-timeout-s", type=float, default=600.0)
    g.add_argument("--seed", type=int, default=0)


def _slos(spec: str) -> dict[str, Slo]:
    slos = {name: Slo(*v) for name, v in DEFAULT_SLOS_MS.items()}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, slo = Slo.parse(part)
        slos[name] = slo
    return slos


def _headers(scenario: str, routing: str) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    key = os.environ.get(f"PDSERVE_LOADTEST_KEY_{scenario.upper()}") if routing == "key" else None
    key = key or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["authorization"] = f"Bearer {key}"
    if routing == "header" and scenario != "default":
        headers["x-pdserve-scenario"] = scenario
    return headers


class TraceReplay(User):
    fixed_count = 1          # one dispatcher: the trace, not a user count, sets the load
    wait_time = constant(1)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.done = False
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=4096))
        self.session.mount("https://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=4096))
        self.model = opts.model or self.session.get(f"{self.host}/v1/models", timeout=30).json()["data"][0]["id"]
        self.planned = plan(opts.trace, opts.trace_file or None, opts.minutes, opts.speedup,
                            opts.max_input_tokens or None, opts.max_output_tokens or None)
        self.slos = _slos(opts.slos)
        for p in self.planned:
            self.slos.setdefault(p.scenario, Slo(*DEFAULT_SLOS_MS["default"]))
        from pdserve.config import load_config
        from pdserve.workers.model.loader import load_tokenizer

        synth = PromptSynthesizer(load_tokenizer(opts.tokenizer or self.model, load_config().model.cache_dir),
                                  opts.seed)
        # Synthesised up front, so that making prompts never delays a send.
        self.prompts = [synth.prompt(p.input_tokens, p.block_hashes, p.index) for p in self.planned]
        self.outcomes: list[Outcome] = []
        _RUN["replay"] = self
        log.info("replaying %d requests over %.1f s", len(self.planned), self.planned[-1].send_s if self.planned else 0)

    @task
    def replay(self) -> None:
        if self.done:
            return
        group = gevent.pool.Group()
        self.t0 = time.perf_counter()
        for p, prompt in zip(self.planned, self.prompts):
            delay = self.t0 + p.send_s - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self._one, p, prompt)
        group.join()
        self.done = True
        write_summary(self)
        runner = self.environment.runner
        gevent.spawn(runner.quit if self.opts.headless else runner.stop)

    def _one(self, p: PlannedRequest, prompt: str) -> None:
        o = Outcome(p.index, p.scenario, p.send_s, time.perf_counter() - self.t0, p.input_tokens, p.output_tokens)
        self.outcomes.append(o)
        body = {"model": self.model, "prompt": prompt, "max_tokens": p.output_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self.session.post(f"{self.host}/v1/completions", data=json.dumps(body), stream=True,
                                   headers=_headers(p.scenario, self.opts.scenario_routing),
                                   timeout=(30, self.opts.request_timeout_s)) as r:
                if r.status_code != 200:
                    o.status, o.error = str(r.status_code), r.text[:300]
                else:
                    self._read_stream(r, o)
        except requests.RequestException as exc:
            o.status, o.error = "connection", f"{exc.__class__.__name__}: {exc}"[:300]
        o.end_s = time.perf_counter() - self.t0
        self.environment.events.request.fire(
            request_type="POST", name=f"completions [{p.scenario}]", response_time=o.e2e_ms,
            response_length=o.output_tokens, context={},
            exception=None if o.status == "ok" else RuntimeError(f"{o.status}: {o.error[:100]}"))

    def _read_stream(self, r, o: Outcome) -> None:
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                o.status, o.error = "stream_error", str(event["error"].get("message", event["error"]))[:300]
                return
            if event.get("choices"):
                now = time.perf_counter() - self.t0
                o.first_token_s = o.first_token_s if o.first_token_s is not None else now
                o.token_times_s.append(now)
            if event.get("usage"):
                o.output_tokens = event["usage"]["completion_tokens"]
                o.prompt_tokens_reported = event["usage"]["prompt_tokens"]
        o.output_tokens = o.output_tokens or len(o.token_times_s)
        o.status = "ok" if o.first_token_s is not None else "empty_stream"


_RUN: dict = {}


def write_summary(replay: TraceReplay) -> dict:
    opts = replay.opts
    meta = {"host": replay.host, "model": replay.model, "trace": opts.trace_file or opts.trace,
            "minutes": opts.minutes, "speedup": opts.speedup, "max_input_tokens": opts.max_input_tokens or None,
            "max_output_tokens": opts.max_output_tokens or None, "planned": len(replay.planned),
            "complete": replay.done}
    summary = summarise(replay.outcomes, replay.slos, meta)
    if opts.summary_dir:
        out = pathlib.Path(opts.summary_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        with (out / "requests.jsonl").open("w") as f:
            for o in sorted(replay.outcomes, key=lambda o: o.index):
                f.write(json.dumps(o.record()) + "\n")
        if replay.outcomes:
            plot(replay.outcomes, replay.slos, out)
    return summary


@events.test_stop.add_listener
def _partial_summary(**_kwargs) -> None:
    # Stopped early (run time, Ctrl-C, the web UI's stop): what was sent so far is still reported.
    replay = _RUN.get("replay")
    if replay is not None and not replay.done:
        write_summary(replay)
