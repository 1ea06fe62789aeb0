"""IC-Cache (SOSP'25) decisions, pure: which cached large-model answers help a new request
(selection), whether a small model with those examples should answer instead of the large one
(the bandit), and what the bounded example cache keeps and re-asks (eviction, replay)."""
