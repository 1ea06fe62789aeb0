"""Locust entry point for trace replay (the implementation lives in pdserve.loadtest so that
`pdserve loadtest` and this file run the same code):

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --trace azure-conv --speedup 5
"""
from pdserve.loadtest.locustfile import TraceReplay  # noqa: F401  (Locust finds the User class here)
