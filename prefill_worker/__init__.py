"""The prefill Ray actor: batches prompts, prefills, samples the first token, pushes the KV
to a decode worker's reservation and holds its copy until released or its hold lease ends.
May import worker_common, kvtransfer, engine, analysis and protos; never decode_worker."""
