"""The load generator's HTTP client against a real router HTTP server (stand-in runner):
the same records as over gRPC: every token stamped, usage, finish reason, server timings."""

from __future__ import annotations

import asyncio

from benchmarks.http_client import HTTPStatusError, OpenAIStreamClient
from benchmarks.loadgen import FixedConcurrency, make_client, run_trace
from benchmarks.workloads import BenchRequest
from tests.router.test_openai_http import Served


def test_run_trace_over_http_records_what_grpc_records():
    s = Served()
    try:
        requests = [BenchRequest(index=i, kind="short", input_tokens=2, output_tokens=3 + i, prompt=f"p {i}")
                    for i in range(4)] + [BenchRequest(index=4, kind="chat", input_tokens=2, output_tokens=2,
                                                       messages=({"role": "user", "content": "hi"},))]
        async def go(api: str, address: str):
            client = make_client(address, 30.0, api=api)
            try:
                return await run_trace(None, requests, FixedConcurrency(2), client=client)
            finally:
                await client.close()

        for api, address in (("http", s.base + "/v1"), ("grpc", f"127.0.0.1:{s.server.port}")):
            records = asyncio.run(go(api, address))
            assert all(r.ok for r in records), [(r.status, r.error) for r in records]
            assert [r.tokens_received for r in records] == [3, 4, 5, 6, 2] == [r.completion_tokens for r in records]
            assert all(len(r.token_times_s) == r.tokens_received and r.prompt_tokens > 0 for r in records)
            assert all(r.server["e2e_ms"] > 0 for r in records), api

        async def refused():
            c = OpenAIStreamClient(s.base + "/v1", 30.0)
            try:
                async for _ in c.stream(prompt="x", max_tokens=0):
                    pass
            except HTTPStatusError as e:
                return e.status, e.code_name
            finally:
                await c.close()

        assert asyncio.run(refused()) == (400, "HTTP_400")
    finally:
        s.close()
