"""OpenAI-compatible HTTP gateway (FastAPI) in front of the router."""
