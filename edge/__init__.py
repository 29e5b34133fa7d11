"""The standalone edge node (no Ray): local RAG over a synced Qdrant Edge shard, INT8 embeddings,
a local chat model, and its sync with the cluster (`edge.sync`)."""
