"""Building blocks shared by every model family: each rank holds only its own shard."""
