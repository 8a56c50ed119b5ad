"""writesae_lens: WriteSAE rank-1 cache-write dictionaries on SAELens (work in progress)."""
