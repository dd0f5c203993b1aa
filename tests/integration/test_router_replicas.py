"""Router replicas (issue 10, section 1): two routers serve one port; SIGKILL one under load
and the other keeps serving, only the streams the dead one carried end, requests that had
not reached it are served (clients retry UNAVAILABLE before the first token), Ray brings the
dead one back serving, and nothing is leaked (KV blocks, actors)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

import grpc
import ray

from benchmarks.deployments import make_config, running
from cluster.pool_manager import named_actors
from cluster.router_replica import router_actor_name
from router.client import AsyncClient
from tests.integration.clusters import block_usage, wait_until

MAX_TOKENS = 24


@dataclass
class Outcome:
    replica: int  # the replica the client's connection was on when the request was sent
    sent_at: float
    ended_at: float = 0.0
    tokens: int = 0
    code: str = "OK"


def stats(namespace: str, n: int) -> list:
    return [ray.get(ray.get_actor(router_actor_name(i), namespace=namespace).stats.remote(), timeout=30)
            for i in range(n)]


async def client_on_each_replica(address: str, namespace: str, per_replica: int) -> dict[int, list[AsyncClient]]:
    """Clients (each its own connection), sorted by the replica the kernel gave their connection:
    open and probe new ones until each replica has ``per_replica`` (bounded)."""
    found: dict[int, list[AsyncClient]] = {0: [], 1: []}
    for _ in range(40):
        if all(len(v) >= per_replica for v in found.values()):
            return found
        client = AsyncClient(address, timeout_s=120)
        before = [s.admitted for s in await asyncio.to_thread(stats, namespace, 2)]
        out = await client.generate("which router am I on?", max_tokens=1)
        assert out.finish_reason is not None
        after = [s.admitted for s in await asyncio.to_thread(stats, namespace, 2)]
        replica = next(i for i in range(2) if after[i] > before[i])
        if len(found[replica]) < per_replica:
            found[replica].append(client)
        else:
            await client.close()
    raise AssertionError(f"40 connections never reached both replicas: {({k: len(v) for k, v in found.items()})}")


async def load(client: AsyncClient, replica: int, outcomes: list[Outcome], stop: asyncio.Event, t0: float) -> None:
    """Back-to-back streams on ``client`` until ``stop``."""
    i = 0
    while not stop.is_set():
        o = Outcome(replica, time.monotonic() - t0)
        outcomes.append(o)
        try:
            async for resp in client.stream(f"request {i} on replica {replica}", max_tokens=MAX_TOKENS,
                                            ignore_eos=True):
                o.tokens += len(resp.token_ids)
        except grpc.RpcError as e:
            o.code = e.code().name
        o.ended_at = time.monotonic() - t0
        i += 1


def test_a_router_replica_killed_under_load_loses_only_its_own_streams(ray_head):
    cfg = make_config(replicas=2, router={"replicas": 2, "max_queued": 64}, kvtransfer={"lease_s": 10.0})
    namespace = cfg.ray.namespace
    with running(cfg) as (d, address):
        assert d.deployment.router is None and len(d.deployment.replicas) == 2
        victim = ray.get_actor(router_actor_name(0), namespace=namespace)
        old_pid = ray.get(victim.pid.remote(), timeout=30)

        async def scenario() -> tuple[list[Outcome], float, int]:
            clients = await client_on_each_replica(address, namespace, per_replica=2)
            outcomes: list[Outcome] = []
            stop = asyncio.Event()
            t0 = time.monotonic()
            tasks = [asyncio.create_task(load(c, r, outcomes, stop, t0))
                     for r, cs in clients.items() for c in cs for _ in range(2)]  # 2 streams per connection
            # Kill once both replicas carry streams.
            deadline = time.monotonic() + 30
            while not all(s.inflight > 0 for s in await asyncio.to_thread(stats, namespace, 2)):
                assert time.monotonic() < deadline, "the load never reached both replicas"
                await asyncio.sleep(0.05)
            carried = (await asyncio.to_thread(stats, namespace, 2))[0].inflight
            os.kill(old_pid, signal.SIGKILL)
            t_kill = time.monotonic() - t0
            await asyncio.sleep(4.0)  # traffic goes on: the victim's clients reconnect to the survivor
            stop.set()
            await asyncio.gather(*tasks)
            for c in [c for cs in clients.values() for c in cs]:
                await c.close()
            return outcomes, t_kill, carried

        outcomes, t_kill, carried = asyncio.run(scenario())
        failed = [o for o in outcomes if o.code != "OK"]
        # Only streams the dead replica carried, and only those already streaming, end in an error.
        assert all(o.replica == 0 and o.tokens > 0 and o.sent_at < t_kill and o.code == "UNAVAILABLE"
                   for o in failed), failed
        assert len(failed) <= min(carried + 1, 4)  # 2 connections x 2 streams on it (+1: one admitted as we killed)
        # Everything else was served in full, on both sides of the kill.
        assert all(o.tokens == MAX_TOKENS for o in outcomes if o.code == "OK")
        after = [o for o in outcomes if o.sent_at > t_kill]
        assert {o.replica for o in after} == {0, 1} and all(o.code == "OK" for o in after), after
        assert any(o.replica == 1 and o.sent_at < t_kill < o.ended_at for o in outcomes if o.code == "OK")

        # Ray restarts the dead replica under its name; it serves the port again.
        wait_until(lambda: replica_pid(namespace, 0) not in (None, old_pid), 90, "router-0 restarted", 0.5)

        async def reaches_replacement() -> None:
            clients = await client_on_each_replica(address, namespace, per_replica=1)
            for c in [c for cs in clients.values() for c in cs]:
                await c.close()

        asyncio.run(reaches_replacement())
        # Nothing the dead replica left on the workers outlives the leases.
        wait_until(lambda: all(used == 0 for used, _free in block_usage(address).values()), 60,
                   "every KV block free again", 0.5)
    assert named_actors(namespace) == []


def replica_pid(namespace: str, index: int) -> int | None:
    """Replica ``index``'s pid once it answers (None while Ray restarts it)."""
    try:
        return ray.get(ray.get_actor(router_actor_name(index), namespace=namespace).pid.remote(), timeout=5)
    except (ValueError, ray.exceptions.RayError):
        return None
