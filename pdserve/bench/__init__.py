"""Benchmarks behind `pdserve bench ...`; each reports a baseline measured in the same run."""

# A benchmark measures the cluster it names. With the P/D ratio controller running, a cluster of
# 2 prefill + 2 decode workers serving max_tokens=1 requests became 3 + 1 within seconds of the
# traffic starting (every `bench prefix` until 2026-12-05 ran so), and a decode worker that became
# a prefill worker left `bench timeline --decode-load` one decode worker whose long streams'
# reservations refused every measured request.
FIXED_ROLES_ENV = {"PDSERVE_ROUTER__CONTROL_INTERVAL_S": "86400"}
