"""The endpoint-broker benchmark suite: `scripts/bench` (see bench/README.md)."""
