"""Open-loop trace replay against any OpenAI-compatible endpoint, with Locust (`pdserve loadtest`,
or `locust -f loadtest/locustfile.py` for the web UI)."""
