"""AuthorizationPolicy in the data plane, with Envoy RBAC's semantics as istiod generates it.
Layer: engines.

Entry points: `compiler.compile_policy` (once per config change) and `engine.AuthzProgram`
(evaluation in Istio's order, with the explanation `extproc explain` prints).

* `compiler.py`: policies compiled into predicates over Attributes
* `engine.py`: evaluation in Istio's order (CUSTOM, DENY, ALLOW, AUDIT) and why
* `matchers.py`: value matchers with the semantics of the Envoy matchers Istio generates
"""
