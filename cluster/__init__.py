"""Local cluster lifecycle, the `orfeas` CLI and the cluster-wide actors."""
