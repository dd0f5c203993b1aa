"""The decode Ray actor (reserve under a lease, receive and import KV, decode in a continuous
batch, stream tokens) and the colocated replica that runs both phases of its requests.
May import worker_common, kvtransfer, engine, analysis and protos; never prefill_worker."""
