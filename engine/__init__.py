"""Runs a model on one device: loading, tokenizer, paged KV memory, the packed forward,
sampling, continuous-batching scheduling, step accounting and the KV hand-off format.
May import analysis and protos only; knows nothing of Ray, gRPC or the packages above it."""
