"""Istio's standard metrics, computed in the data plane. Layer: engines. No grpc, asyncio or
Envoy protos here: the adapters in `extproc.services` build the records.

* `labels.py`: the metric table and the named label tuples, in the stats filter's order
* `record.py`: a finished request or TCP report, and the `Labeler` that labels it
* `recorder.py`: records into metric updates, once per request
* `store.py`: the series tables and their Prometheus text
* `peer.py`, `exchange.py`: workload identity and Istio's metadata exchange
* `directory.py`: peers and services listed as WorkloadEntry and ServiceEntry
* `resource.py`: the Telemetry resource: model, validation, loading
* `cel.py`: the CEL subset of tag values; `celsyntax.py`: the CEL syntax check of log filters
* `overrides.py`: Telemetry resources compiled to metric plans
* `collector.py`: extproc's metrics about the telemetry pipeline
"""
