"""The admin HTTP API (FastAPI): queue operations, health and Prometheus metrics."""
