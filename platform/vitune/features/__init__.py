"""The feature store: shard format and manifest (store), and the Ray Data job that fills it (extract)."""
