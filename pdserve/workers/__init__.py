"""Model workers: the torch model runner, KV cache and the prefill/decode gRPC services."""
