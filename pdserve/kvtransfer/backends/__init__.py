"""KV transfer backends; import one only through pdserve.kvtransfer.create_agent."""
