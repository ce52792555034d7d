"""Plumbing every stage shares, kept apart from the shard-set format: the config and command-line loader,
errors, model folders and hub downloads, atomic writes and locks, fingerprints, dtype names.

Nothing here imports torch at module level (those that need it import it where tensors are handled), so a
command that only reads JSON, such as `python -m shards inspect`, starts without it."""
