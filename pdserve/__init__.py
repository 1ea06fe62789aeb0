"""pdserve: a control plane for LLM serving with disaggregated prefill and decode."""

__version__ = "0.1.0"
