"""The inference endpoints, each only its shapes (``api/inference.Endpoint``):
chat completions, completions, embeddings and responses."""
