"""The assembly: configuration files loaded, compiled by the engines into one immutable
Snapshot per workload, and swapped on reload. Layer: assembly, above the engines and below the
decision path and the services.

* `loader.py`: every resource from the config directories, or the whole set rejected
* `compiled.py`: the Snapshot, built once per change
* `central.py`: central mode's per-workload snapshots
* `reload.py`: the holder that swaps snapshots, and its collector
"""
