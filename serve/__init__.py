"""Ray Serve applications: the OpenAI-compatible gateway and the services behind it."""
