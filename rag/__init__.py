"""Retrieval core shared by jobs and serve: documents, chunking, vector stores, hybrid retrieval."""
