"""A fake ``Serving`` server for the load generator's tests: streams
``max_tokens`` tokens, one response each, ``GAP_S`` apart.

``python -m tests.benchmarks.fake_serving`` serves it on a free port, prints
the address on the first line of stdout, and runs until terminated.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from protos import serving_pb2, serving_pb2_grpc

GAP_S = 0.004
FAIL_TOKENS = 13  # the fake server refuses requests asking for this many tokens


class FakeServing(serving_pb2_grpc.ServingServicer):
    """Streams ``max_tokens`` tokens, one response each, ``GAP_S`` apart."""

    def __init__(self) -> None:
        self.requests: dict[str, serving_pb2.GenerateRequest] = {}
        self.in_flight = self.max_in_flight = 0

    async def Generate(self, request, context):
        self.requests[request.request_id] = request
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = request.sampling.max_tokens
            if n == FAIL_TOKENS:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queues are full")
            for i in range(n):
                await asyncio.sleep(GAP_S)
                yield serving_pb2.GenerateResponse(request_id=request.request_id, token_ids=[i], text=f"<{request.request_id}:{i}>")
            yield serving_pb2.GenerateResponse(
                request_id=request.request_id, finish_reason=serving_pb2.FINISH_REASON_LENGTH,
                usage=serving_pb2.Usage(prompt_tokens=7, completion_tokens=n),
                timings=serving_pb2.Timings(queue_ms=1.0, prefill_ms=2.0, transfer_ms=3.0))
        finally:
            self.in_flight -= 1

    async def ClusterStatus(self, request, context):
        return serving_pb2.ClusterStatusResponse(model="builtin:tiny-llama")


async def start_fake() -> tuple[grpc.aio.Server, str, FakeServing]:
    fake = FakeServing()
    server = grpc.aio.server()
    serving_pb2_grpc.add_ServingServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", fake


async def _main() -> None:
    server, address, _ = await start_fake()
    print(address, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_main())
    sys.exit(0)
