"""extproc: Istio authorization and telemetry served to Envoy from the data plane."""

__version__ = "0.1.0"
