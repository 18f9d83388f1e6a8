"""Load generators and server benchmarks (bounded, loopback only)."""
