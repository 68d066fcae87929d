"""The independent reference side of the differential tests and of the benchmark's `native`
mode: Istio's AuthorizationPolicy and RequestAuthentication translated to Envoy's own RBAC and
jwt_authn filter configs, as istiod does it. Not shipped with extproc and not run by `extproc
serve`; it imports none of extproc's engines (tests/unit/test_reference_independence.py), so a
misreading of Istio's semantics has to be made twice, independently, to go unnoticed."""
