"""Envoy's protocols: each transport adapts the wire to `Attributes`, asks the shared `Enforcer`
and renders the `Verdict` back. Layer: transports.

* `enforcer.py`: the pipeline every transport shares (cache, CUSTOM, JWT, policies), its stats
  and their collector
* `authz.py`, `check_adapter.py`, `authz_render.py`: ext_authz over gRPC (HTTP and TCP)
* `http_authz.py`, `http_check_adapter.py`, `http_check_render.py`: ext_authz `http_service`
* `processor.py`, `processing_adapter.py`, `processor_render.py`: ext_proc
* `accesslog.py`: the access log service, Istio's metrics and spans from Envoy's entries
* `central.py`: central mode: which workload a call is for, and its collector
* `custom.py`: CUSTOM providers over gRPC and HTTP
* `headers.py`: request headers as every adapter reads them
* `protoconv.py`, `wire.py`: protobuf conversions and the one piece written in wire format
"""
