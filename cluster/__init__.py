"""The control plane: the `orfeas` CLI, local cluster lifecycle, deploy, demo, KubeRay render and validate."""
