"""Benchmarks (``duet-jax bench NAME``). Peers are imported inside functions only: the core never
needs torch."""
