"""Metrics, request ids and structured logs: what an operator watches. See README "Observability"."""
