"""The pools outlive the process that launched them, and the pool manager outlives itself
(issue 10, section 1): SIGKILL the launch process, the pool manager, or fail a worker's start,
and the deployment keeps (or comes back to) serving without leaking an actor."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ray
import yaml

from benchmarks.deployments import make_config, running
from cluster import pool_manager as pm_module
from cluster.deployment import pool_specs
from cluster.local_ray import free_port
from cluster.pool_manager import POOL_MANAGER_NAME, PoolManager, WorkerStartError, named_actors
from cluster.router_replica import ROUTER_NAME_PREFIX
from kvtransfer.endpoints import InProcEndpoint
from router.client import Client
from tests.integration.clusters import wait_until


def worker_names(namespace: str) -> set[str]:
    return {n for n in named_actors(namespace) if pm_module.WORKER_NAME.fullmatch(n)}


def launch(config: Path, head) -> subprocess.Popen:
    env = {**head.env(), "RAY_ADDRESS": head.gcs_address}
    return subprocess.Popen([sys.executable, "-m", "cluster.launch", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    client = Client(address)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.wait_ready(timeout_s=2)
                return
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError("launch never served; its output:\n" + proc.stdout.read()[-3000:])
    finally:
        client.close()


def test_launch_killed_pools_survive_and_a_relaunch_adopts_them(ray_head, tmp_path):
    port, namespace = free_port(), "test-launch-killed"
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "builtin:tiny-llama", "max_model_len": 1024},
        "pools": {"ratio": "1:1", "replicas": 2, "prefill": {"num_cpus": 0.5, "num_blocks": 128},
                  "decode": {"num_cpus": 0.5, "num_blocks": 256}},
        "router": {"host": "127.0.0.1", "port": port, "metrics_port": None, "http_port": None, "drain_grace_s": 5},
        "ray": {"namespace": namespace},
    }))
    address = f"127.0.0.1:{port}"
    first = launch(config, ray_head)
    relaunch = None
    try:
        wait_serving(address, first)
        before = Client(address).generate("before the kill", max_tokens=8, ignore_eos=True)
        workers = worker_names(namespace)
        assert len(workers) == 2
        routers = router_pids(namespace)
        assert len(routers) == 2  # router.replicas defaults to 2: actors of their own, not the launch process
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(3)  # long enough for Ray to reap whatever the dead driver owned
        assert worker_names(namespace) == workers
        manager = ray.get_actor(POOL_MANAGER_NAME, namespace=namespace)
        table = ray.get(manager.table.remote(), timeout=30)
        assert table.worker_ids() == workers
        # The router replicas did not die with the launch: the port serves with no launch process at all.
        orphaned = Client(address).generate("before the kill", max_tokens=8, ignore_eos=True)
        assert orphaned.token_ids == before.token_ids
        relaunch = launch(config, ray_head)
        relaunch_output = collect_lines(relaunch)
        wait_until(lambda: any("splitserve: serving" in line for line in relaunch_output) or relaunch.poll() is not None,
                   300, "the relaunch serving", 0.2)
        assert relaunch.poll() is None, "".join(relaunch_output)[-3000:]
        after = Client(address).generate("before the kill", max_tokens=8, ignore_eos=True)
        assert after.token_ids == before.token_ids
        assert worker_names(namespace) == workers  # rediscovered, none created anew
        assert router_pids(namespace) == routers  # the replicas adopted too
        # Killed again, nothing stops the detached actors: `cluster.submit --stop`'s teardown does.
        relaunch.send_signal(signal.SIGKILL)
        relaunch.wait(timeout=30)
        assert worker_names(namespace) == workers
        env = {**ray_head.env(), "RAY_ADDRESS": ray_head.gcs_address}
        teardown = subprocess.run([sys.executable, "-m", "cluster.launch", "--config", str(config), "--teardown"],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert teardown.returncode == 0, teardown.stderr[-2000:]
        # Every actor it found: the manager, the workers and the 2 routers (the live manager may have started a
        # replacement worker meanwhile on a loaded host: that one is killed too, and counted).
        killed = teardown.stdout.partition("leftover actors of namespace")[2]
        assert all(name in killed for name in [*workers, "pool_manager", "router-0", "router-1"]), teardown.stdout
        assert named_actors(namespace) == []  # the teardown returns once its kills took effect
    finally:
        for p in (first, relaunch):
            if p is not None and p.poll() is None:
                p.kill()
        pm_module.kill_named_actors(namespace)


def test_pool_manager_killed_serving_continues_and_it_returns_to_repair(ray_head):
    cfg = make_config(replicas=2)
    with running(cfg) as (d, address):
        client = Client(address)
        namespace = cfg.ray.namespace
        manager = ray.get_actor(POOL_MANAGER_NAME, namespace=namespace)
        workers = worker_names(namespace)
        os.kill(ray.get(manager.pid.remote(), timeout=30), signal.SIGKILL)
        # While it is gone (and while it comes back), the router routes with the workers it knows.
        outs = [client.generate(f"served without a manager {i}", max_tokens=4, ignore_eos=True) for i in range(4)]
        assert all(len(o.token_ids) == 4 for o in outs)
        # It returns under its name and adopts the live workers instead of creating new ones.
        wait_until(lambda: adopted(namespace) == workers, 120, "the manager back, adopting", 0.5)
        assert worker_names(namespace) == workers
        # Health checking resumed: a later worker death is repaired.
        manager = ray.get_actor(POOL_MANAGER_NAME, namespace=namespace)
        victim = sorted(n for n in workers if n.startswith("decode"))[0]
        os.kill(ray.get(ray.get_actor(victim, namespace=namespace).pid.remote(), timeout=30), signal.SIGKILL)
        wait_until(lambda: ray.get(manager.counts.remote(), timeout=30) == {"prefill": 1, "decode": 1}
                   and victim not in worker_names(namespace), 120, "the dead decode worker replaced", 0.5)
        out = client.generate("after the repair", max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4
        client.close()
    assert named_actors(namespace) == []


def router_pids(namespace: str) -> dict[str, int]:
    """The router replicas of ``namespace`` and their pids."""
    return {n: ray.get(ray.get_actor(n, namespace=namespace).pid.remote(), timeout=60)
            for n in named_actors(namespace) if n.startswith(ROUTER_NAME_PREFIX)}


def collect_lines(proc: subprocess.Popen) -> list[str]:
    """The lines ``proc`` prints, appended by a thread as they come."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def adopted(namespace: str) -> set[str] | None:
    """The workers the pool manager's current incarnation adopted; None while it is restarting."""
    try:
        manager = ray.get_actor(POOL_MANAGER_NAME, namespace=namespace)
        return set(ray.get(manager.stats.remote(), timeout=30).adopted)
    except (ValueError, ray.exceptions.RayError):
        return None


def flaky_worker(counter: str, failures: int, slow_s: float):
    """A worker class whose first ``failures`` starts raise (each start counted in the file ``counter``)."""

    class Flaky:
        def __init__(self, worker_id, *, model, engine, handoff):
            self.worker_id = worker_id
            path = Path(counter)
            n = int(path.read_text()) if path.exists() else 0
            path.write_text(str(n + 1))
            if n < failures:
                time.sleep(slow_s)
                raise RuntimeError(f"injected start failure {n}")

        def ping(self):
            return True

        def endpoint(self):
            return InProcEndpoint(worker_id=self.worker_id)

        def node_id(self):
            return "node"

        def status(self):
            # The manager reads the kind a worker serves now from its status (role switching).
            return SimpleNamespace(kind="colocated")

        def shutdown(self):
            return None

    return Flaky


def test_worker_that_fails_to_start_is_retried_with_backoff_and_never_leaked(ray_head, tmp_path, monkeypatch):
    cfg = make_config(mode="colocated", replicas=1)
    namespace = cfg.ray.namespace
    spec = dataclasses.replace(pool_specs(cfg)[0], num_cpus=0.1)
    counter = tmp_path / "starts"
    monkeypatch.setitem(pm_module.WORKER_CLASSES, "colocated", flaky_worker(str(counter), failures=2, slow_s=2.0))

    async def go():
        manager = PoolManager([spec], (1,), (1,), namespace=namespace, health_interval_s=0.2)
        try:
            try:
                await manager.start()
                raise AssertionError("the first start was meant to fail")
            except WorkerStartError as e:
                assert "injected start failure 0" in str(e)
            # The health loop retries in the background; the lock is never held while a worker starts.
            t0 = time.monotonic()
            while manager.start_failures < 2:
                await asyncio.wait_for(manager.check_health(), timeout=1.0)
                await asyncio.sleep(0.1)
                assert time.monotonic() - t0 < 120
            while await manager.counts() != {"colocated": 1}:
                await asyncio.sleep(0.2)
                assert time.monotonic() - t0 < 120
            assert int(counter.read_text()) == 3  # two failures, then one that started
            # Nothing half-started is left: the only actor of the namespace is the one worker.
            assert worker_names(namespace) == {w.worker_id for w in manager.workers.values()}
            assert len(worker_names(namespace)) == 1
        finally:
            await manager.stop()
            pm_module.kill_named_actors(namespace)

    asyncio.run(go())
    assert named_actors(namespace) == []


def test_retry_delay_backs_off_exponentially_up_to_a_cap():
    delays = [pm_module.retry_delay_s(n) for n in range(1, 12)]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays == sorted(delays) and max(delays) == pm_module.RETRY_MAX_S
