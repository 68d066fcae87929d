"""Istio's standard metrics, computed in the data plane.

`labels` holds the ordered label list and the identity of each side; `peer` the
metadata-exchange codec; `record` turns a finished request or a TCP report into label
values; `store` keeps the series in plain tables and renders them at scrape time;
`overrides` applies Telemetry-API style tag overrides. No grpc, asyncio or Envoy protos
here: the adapters in `extproc.services` build the records.
"""
