"""Training data: the batch streams (webdataset shards, feature cache, in-memory, synthetic), their
datamodules, exact resume, curricula, and video decoding."""
