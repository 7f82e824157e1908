"""End to end behind a real balancer: 3 ``hotmerge serve`` replicas on the embedded default,
HAProxy (``deploy/haproxy.cfg``) in front, all traffic through it, on loopback.

- affinity: 20 merge specs sent 10 times each are merged 20 times in all (each on one replica);
- health: NOT_SERVING while loading, SERVING, NOT_SERVING while draining (gRPC and /readyz);
- failover: under a bounded load, one replica gets SIGTERM (drains, exits 0) and another
  SIGKILL; every request succeeds except, at most, those in flight on the killed one.

Figures go to stdout (``pytest -s tests/deploy``). Skipped only without haproxy outside CI.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hotmerge.client import HotmergeClient
from hotmerge.embedded import ensure_embedded

from tests.deploy.fleet import (
    Balancer,
    Replica,
    health_status,
    http_get,
    replica_dirs,
    wait_until,
)
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None and os.environ.get("CI") != "true",
    reason="haproxy is not installed (`apt-get install haproxy`; CI installs it)",
)

N_REPLICAS = 3
N_SPECS = 20
SENDS_PER_SPEC = 10
DEADLINE_S = 30.0  # of every request, retries included
# A request in flight on a replica that dies after sending response headers (the merge keys go
# out as initial metadata before generating) is ended by HAProxy with a clean END_STREAM and no
# gRPC trailers, which gRPC reports as UNKNOWN "Stream removed"; one that got no header yet
# becomes HTTP 502, which gRPC reports as UNAVAILABLE. Both are cut off by the SIGKILL.
STREAM_REMOVED = "Stream removed"
LONG_TOKENS = 60  # the requests in flight on the draining replica: about 2 s on 2 cores


def spec(i: int) -> dict:
    """Distinct two-adapter linear merges (never the identity, so each one is really merged)."""
    return {"ids": ["demo-a", "demo-b"], "weights": [1.0, round(0.05 * (i + 1), 2)]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    ensure_embedded(tmp / "template")
    replicas = [
        Replica(f"r{i + 1}", free_port(), free_port(), data_dir, tmp / f"r{i + 1}.log")
        for i, data_dir in enumerate(replica_dirs(tmp, tmp / "template", N_REPLICAS))
    ]
    balancer = Balancer(free_port(), tmp / "haproxy.cfg", tmp / "haproxy.sock", tmp / "lb.log")
    try:
        for r in replicas:
            r.start("--default-max-new-tokens", "2", "--grace-s", "20", "--max-workers", "16")
        with ThreadPoolExecutor(N_REPLICAS) as pool:  # from the start: NOT_SERVING comes first
            list(pool.map(lambda r: r.watch_health(timeout=120), replicas))
        balancer.start(replicas)
        balancer.wait_up([r.name for r in replicas], timeout=30)
        yield replicas, balancer
    finally:
        for r in replicas:
            r.kill()
        balancer.kill()


def test_health_and_http_endpoints_while_serving(fleet):
    replicas, _ = fleet
    for r in replicas:
        assert r.health_seen == ["NOT_SERVING", "SERVING"], r.log()
    r1 = replicas[0]
    base = f"http://127.0.0.1:{r1.http_port}"
    assert http_get(f"{base}/healthz") == (200, "ok\n")
    assert http_get(f"{base}/readyz") == (200, "serving\n")
    assert http_get(f"{base}/nope")[0] == 404


def test_one_spec_is_merged_on_one_replica(fleet):
    replicas, balancer = fleet
    jobs = [i for i in range(N_SPECS) for _ in range(SENDS_PER_SPEC)]
    random.Random(0).shuffle(jobs)

    def send(i: int) -> str:
        reply = client.generate("hi", merged_adapters=spec(i), max_new_tokens=1)
        assert reply.generated_tokens == 1
        return reply.merge.affinity_key

    with (
        HotmergeClient(balancer.target, timeout=DEADLINE_S) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        keys = list(pool.map(send, jobs))
    assert len(set(keys)) == N_SPECS
    misses = {r.name: r.merge_misses() for r in replicas}
    print(f"\naffinity: {len(jobs)} requests, {N_SPECS} specs; merges per replica {misses}")
    assert sum(misses.values()) == N_SPECS  # so each spec was merged once, on one replica


def test_requests_without_a_merge_key_spread_round_robin(fleet):
    replicas, balancer = fleet
    before = [r.generate_ok() for r in replicas]
    with HotmergeClient(balancer.target, timeout=DEADLINE_S) as client:
        for _ in range(3 * N_REPLICAS):
            client.generate("hi", adapter_id="demo-a", max_new_tokens=1)
    served = {r.name: r.generate_ok() - b for r, b in zip(replicas, before, strict=True)}
    print(f"\nno key: {3 * N_REPLICAS} requests served per replica {served}")
    assert all(n > 0 for n in served.values()), served


def test_failover_sigterm_drains_sigkill_fails_over(fleet):
    replicas, balancer = fleet
    survivor, drained, killed = replicas
    results: list[tuple[str, float]] = []
    failures: list[str] = []  # what the failed requests said, for the report
    cut_off: list[str] = []  # details of the requests cut off by the SIGKILL
    stop = threading.Event()

    def load(worker: int) -> None:
        with HotmergeClient(balancer.target, timeout=DEADLINE_S) as client:
            for n in range(200):  # bounded: about 6 s of load ends it sooner
                if stop.is_set():
                    return
                i = (worker * 7 + n) % N_SPECS
                options = {"merged_adapters": spec(i)} if n % 4 else {"adapter_id": "demo-a"}
                started = time.monotonic()
                try:
                    client.generate("hi", max_new_tokens=2, **options)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                    failures.append(f"{code} {options} {err.details()}")
                    if code == "UNKNOWN" and err.details().startswith(STREAM_REMOVED):
                        code = "CUT_OFF"
                        cut_off.append(err.details())
                results.append((code, time.monotonic() - started))

    long_done: list[int] = []
    long_started = threading.Barrier(3, timeout=30)

    def long_request() -> None:
        """In flight on the replica that drains: straight to it, so it surely is there."""
        with HotmergeClient(drained.target, timeout=DEADLINE_S, retry=False) as client:
            stream = client.generate_stream("hi", adapter_id="demo-b", max_new_tokens=LONG_TOKENS)
            for n, msg in enumerate(stream):
                if n == 0:
                    long_started.wait()
                if msg.done:
                    long_done.append(msg.generated_tokens)

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    workers += [threading.Thread(target=long_request) for _ in range(2)]
    for t in workers:
        t.start()
    try:
        long_started.wait()
        time.sleep(0.5)
        term_at = time.monotonic()
        drained.signal(signal.SIGTERM)
        exited_at: list[float] = []
        watcher = threading.Thread(
            target=lambda: (drained.proc.wait(timeout=60), exited_at.append(time.monotonic()))
        )
        watcher.start()
        # Draining: NOT_SERVING on gRPC health and 503 on /readyz while the long requests run.
        wait_until(
            lambda: health_status(drained.target) == "NOT_SERVING", 10, "NOT_SERVING on drain"
        )
        drained.health_seen.append("NOT_SERVING")
        code, body = http_get(f"http://127.0.0.1:{drained.http_port}/readyz")
        assert (code, body) == (503, "draining\n")
        time.sleep(0.3)
        killed.signal(signal.SIGKILL)
        time.sleep(4)
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=DEADLINE_S + 10)
    assert not any(t.is_alive() for t in workers), "a request hung past its deadline"

    watcher.join(timeout=60)
    assert drained.proc.wait(timeout=1) == 0, drained.log()
    drain_s = exited_at[0] - term_at
    logged = re.search(r"drained in ([\d.]+) s", drained.log())
    assert long_done == [LONG_TOKENS, LONG_TOKENS], drained.log()  # it finished them
    assert drained.health_seen == ["NOT_SERVING", "SERVING", "NOT_SERVING"]

    codes = Counter(code for code, _ in results)
    misses = {r.name: r.merge_misses() for r in (survivor,)}
    print(
        f"\nfailover: {len(results)} requests through the balancer, {codes['OK']} succeeded, "
        f"failed by code {dict((c, n) for c, n in codes.items() if c != 'OK')}; "
        f"longest {max(s for _, s in results):.2f} s; drain {logged and logged.group(1)} s "
        f"(SIGTERM to exit {drain_s:.2f} s); survivor merges {misses}; "
        f"haproxy sees {balancer.server_states()}; failures {failures}"
    )
    assert set(codes) <= {"OK", "UNAVAILABLE", "CUT_OFF"}, codes
    # Only requests in flight on the killed replica may fail: at most one per load worker.
    assert codes["UNAVAILABLE"] + codes["CUT_OFF"] <= 4, (codes, cut_off)
    assert max(s for _, s in results) < DEADLINE_S
