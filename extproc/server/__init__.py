"""The process: `extproc serve`'s wiring and listeners. Layer: process.

* `app.py`: wiring (gRPC services, admin listener, config watcher, collectors)
* `settings.py`: the flags and their EXTPROC_* variables
* `check_http.py`: the raw HTTP/1.1 listener for ext_authz `http_service` checks
* `http.py`: the small HTTP/1.1 server the admin endpoint runs on
* `admin.py`: /healthz, /readyz, /metrics, /debug/*; registers every collector
"""
