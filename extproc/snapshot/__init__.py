"""The assembly layer: configuration files loaded (loader), compiled by the engines into one
immutable Snapshot for a workload (compiled), per-workload snapshots for central mode
(central), and the holder that swaps in a new snapshot on reload (reload). Above the engines,
below the decision path and the services."""
