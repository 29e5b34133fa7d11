"""Ray job entrypoints, each run as `python -m jobs.<name>`."""
