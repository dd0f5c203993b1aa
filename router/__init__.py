"""The client-facing servers: gRPC and the OpenAI-compatible HTTP API over one request lifecycle; request
decoding and validation, routing policies, the view of the pools, each request's path through them
(retries, resume), security, client. May import any package below it (observability down to protos); never cluster or benchmarks."""
