"""Data: records, readers, packing into WebDataset shards, loaders, the synthetic benchmark."""
