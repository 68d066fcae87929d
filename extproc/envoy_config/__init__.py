"""`extproc envoy-config`: the Envoy bootstrap of each mode and side of the mesh, built from
Envoy's typed API and written as commented YAML. The files in envoy/ are its output with the
default addresses (tests/e2e/test_shipped_configs.py fails when they drift).

envoy-data-plane is imported only here, when a config is generated: `extproc serve` never
loads it. Layer: tools.

* `options.py`: the mode, the side and the addresses
* `build.py`: the typed bootstrap
* `notes.py`: its header and field notes
* `render.py`: commented YAML from a typed message
"""

from __future__ import annotations

from extproc.envoy_config.options import Endpoint, Mode, Options, Side, build_options


def generate(options: Options) -> str:
    from extproc.envoy_config import build, notes, render

    boot = build.bootstrap(options)
    return render.render(boot, notes.header(options, boot), notes.style(options))


__all__ = ["Endpoint", "Mode", "Options", "Side", "build_options", "generate"]
