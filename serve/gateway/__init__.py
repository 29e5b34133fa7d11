"""The OpenAI-compatible gateway: the Serve ingress in front of every model."""
