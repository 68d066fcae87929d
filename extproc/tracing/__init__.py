"""Distributed tracing in the data plane: trace-context propagation (W3C, B3) and sampling."""
