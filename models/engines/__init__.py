"""Chat and embedding engines. Each is plain Python; `serve.model_apps` hosts them on Ray Serve."""
