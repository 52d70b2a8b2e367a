"""Predicted embeddings -> images: retrieval from the cache or Stable unCLIP."""
