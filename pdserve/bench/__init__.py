"""Benchmarks behind `pdserve bench ...`; each reports a baseline measured in the same run."""
