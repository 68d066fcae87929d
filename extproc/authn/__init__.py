"""RequestAuthentication (JWT) in the data plane, with Envoy jwt_authn's semantics. Layer: authn,
below the config vocabulary (which validates inline key sets with it).

Entry points: `program.AuthnProgram` (what applies to a workload, compiled from jwtRules) and
`verifier.authenticate` (one request against it).

* `program.py`: providers, token locations and requirements compiled from jwtRules
* `verifier.py`: walks a program's requirement tree over one request
* `token.py`: parsing a compact JWS as jwt_verify_lib does
* `keys.py`: JSON Web Key Sets parsed with jwt_verify_lib's rules; signature checks
* `status.py`: the outcomes, with jwt_authn's exact messages
* `cache.py`: parsed tokens and their signature verdicts (bounded), and its collector
* `jwks_source.py`: fetching and refreshing remote key sets, and their collector
"""
