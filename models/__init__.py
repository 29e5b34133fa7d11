"""Models: the OpenAI protocol types, chat engines (transformers, vLLM via ray.serve.llm, remote
OpenAI-compatible providers), embedders and the Serve deployments that host them."""
