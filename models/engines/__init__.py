"""Chat and embedding engines. Each is plain Python; `models.serving` hosts them on Ray Serve."""
