"""Training data: `sample` (one example), `batch` (collate -> Batch, the delay pattern), `shards` (the on-disk
format, written and read in one module), `dataset` (ShardDataset, the stable split, the batch sampler)."""
