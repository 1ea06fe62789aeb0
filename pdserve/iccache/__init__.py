"""IC-Cache's adapters: sentence embeddings, the vector index, and the service that joins them to
the store and to the pure decisions in pdserve/policy/iccache."""
