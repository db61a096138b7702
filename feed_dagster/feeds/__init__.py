"""Per-user feeds in user shards: the batch driver around the candidate pipeline."""
