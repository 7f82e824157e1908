"""Host cost of streaming tokens over gRPC, and what it does to the engine thread, without a GPU.

Serving at concurrency 64 on the H100 was host-bound: the engine thread's host work a step took
longer than the device's step, and much of it was waiting for the GIL held by the request
threads (``results/gpu-checks-H100-2026-12-07-f/NOTES.md``). This isolates that: ``S`` streams
of ``GenerateStreamResponse`` messages (hotmerge's proto) from a gRPC server in this process to
clients in another, one message a stream a step, and an **emulated engine thread**: each step it
runs ``--engine-py-ms`` of Python in ``--engine-releases`` pieces separated by GIL releases (as
torch calls release it), then hands each stream its token and releases the GIL for
``--device-ms`` (the device's step). Its step period beyond ``device + python`` is what the
other threads cost it.

Servers: ``sync`` (``grpc.server`` with a thread per stream, as ``hotmerge serve`` ran until
2026-12-07), ``aio`` (``grpc.aio``: one event loop serves every stream; tokens handed over once
a step with ``call_soon_threadsafe``) and ``hotmerge`` (hotmerge's own front since then: its
grpc.aio server, servicer and interceptors over a request path whose engine is the emulated
one, a ``call_soon_threadsafe`` a token); first, ``none``: the engine alone, the lateness of its
own sleeps.
Reported per server: the engine step's period (p50 / p99) and its lateness, and the server
process's CPU time per message beyond the engine thread's own.

    python benchmarks/grpc_stream_cost.py --streams 32,64 --steps 300
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import platform
import queue
import resource
import statistics
import threading
import time
from concurrent import futures

import grpc
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pbg

_RELEASE_INPUT = bytes(4096)


def message(step: int) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(token=pb.Token(id=step, text=" ab", logprob=-0.5), text=" ab")


class Engine:
    """The emulated engine thread: Python work in pieces, a token a stream, the device's wait."""

    def __init__(self, args, deliver) -> None:
        self.args, self.deliver, self.periods = args, deliver, []
        self.piece_s = args.engine_py_ms / 1e3 / args.engine_releases

    def run(self) -> None:
        t_prev = time.perf_counter()
        for step in range(self.args.steps):
            for _ in range(self.args.engine_releases):
                end = time.perf_counter() + self.piece_s  # Python holding the GIL
                while time.perf_counter() < end:
                    pass
                # A torch call: the GIL released around a few µs of C (hashlib releases it for
                # inputs over 2 KiB), no system call.
                hashlib.sha256(_RELEASE_INPUT)
            self.deliver(step)
            time.sleep(self.args.device_ms / 1e3)  # the device's step: the GIL released
            now = time.perf_counter()
            self.periods.append((now - t_prev) * 1e3)
            t_prev = now
        self.deliver(None)


def run_clients(port: int, streams: int, steps: int) -> None:
    """Every stream in one client process (a thread each), reading to the end; exits 1 unless
    every stream got every step's message."""
    counts = []

    def one() -> None:
        stub = pbg.HotmergeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        counts.append(sum(1 for _ in stub.GenerateStream(pb.GenerateRequest(inputs="x"))))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if counts != [steps] * streams:
        raise SystemExit(f"streams got {counts} messages, not {steps} each")


def start_clients(port: int, streams: int, steps: int) -> mp.Process:
    proc = mp.get_context("spawn").Process(target=run_clients, args=(port, streams, steps))
    proc.start()
    return proc


def finish(clients: mp.Process) -> None:
    clients.join()
    if clients.exitcode != 0:
        raise RuntimeError(f"the clients failed (exit code {clients.exitcode})")


def serve_and_measure(server, args, streams: int, ready, deliver, messages: int) -> dict:
    """Start ``server`` (a ``grpc.Server``, or anything with its port, start and stop calls),
    its clients, wait until every stream is ``ready``, measure, and stop it."""
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    clients = start_clients(port, streams, messages)
    ready.wait()
    result = measure(args, streams, deliver)
    finish(clients)
    server.stop(0)
    return result


def sync_server(args, streams: int) -> dict:
    queues: list[queue.SimpleQueue] = []
    ready = threading.Event()

    class Service(pbg.HotmergeServicer):
        def GenerateStream(self, request, context):
            q = queue.SimpleQueue()
            queues.append(q)
            if len(queues) == streams:
                ready.set()
            while (step := q.get()) is not None:
                yield message(step)

    def deliver(step):
        for q in queues:
            q.put(step)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=streams + 8))
    pbg.add_HotmergeServicer_to_server(Service(), server)
    return serve_and_measure(server, args, streams, ready, deliver, args.steps)


def hotmerge_server(args, streams: int) -> dict:
    """hotmerge's own gRPC front (``api/grpc_server.py``: grpc.aio, its servicer, drain and
    decode interceptors) over a request path whose engine is the emulated one: each step puts
    a token on every request's handle from the engine thread, as the worker does."""
    from hotmerge.api.core import RequestPath, Submission
    from hotmerge.api.grpc_server import GrpcServer, LoopHealth, LoopThread
    from hotmerge.api.grpc_service import HotmergeService
    from hotmerge.api.grpc_wire import DecodeErrorInterceptor
    from hotmerge.engine import GenerationHandle
    from hotmerge.generation import FinishReason, GenerationResult, Timings, TokenEvent
    from hotmerge.lifecycle import Lifecycle
    from hotmerge.metrics import Metrics

    handles: list[GenerationHandle] = []
    ready = threading.Event()

    class EmulatedPath(RequestPath):
        def submit(self, request, *, merged_adapters=None, deadline=None, cancelled=None, **_):
            handle = GenerationHandle(request, deadline)
            handles.append(handle)
            if len(handles) == streams:
                ready.set()
            return Submission(request, handle, None, None)

    def deliver(step):
        for handle in handles:
            if step is None:
                done = GenerationResult(" ab" * args.steps, FinishReason.LENGTH, args.steps, [],
                                        Timings())  # fmt: skip
                handle._put(done)
            else:
                handle._put(TokenEvent(step, " ab", -0.5))

    loop = LoopThread(8)
    lifecycle = Lifecycle(LoopHealth(loop), ("",), guarded="hotmerge.v1.Hotmerge")
    lifecycle.set_serving()
    server = GrpcServer(
        loop, interceptors=[lifecycle.interceptor(), DecodeErrorInterceptor()], options=[]
    )
    path = EmulatedPath(default_max_new_tokens=args.steps, max_merge_adapters=4, metrics=Metrics())
    pbg.add_HotmergeServicer_to_server(HotmergeService(path=path), server.server)
    # Each stream ends with the final message (done, the result's text and timings).
    return serve_and_measure(server, args, streams, ready, deliver, args.steps + 1)


def aio_server(args, streams: int) -> dict:
    async def main() -> dict:
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = []
        ready = threading.Event()

        class Service(pbg.HotmergeServicer):
            async def GenerateStream(self, request, context):
                q = asyncio.Queue()
                queues.append(q)
                if len(queues) == streams:
                    ready.set()
                while (step := await q.get()) is not None:
                    yield message(step)

        def put_all(step):
            for q in queues:
                q.put_nowait(step)

        server = grpc.aio.server()
        pbg.add_HotmergeServicer_to_server(Service(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        clients = start_clients(port, streams, args.steps)
        await loop.run_in_executor(None, ready.wait)
        result = await loop.run_in_executor(
            None, measure, args, streams, lambda step: loop.call_soon_threadsafe(put_all, step)
        )
        await loop.run_in_executor(None, finish, clients)
        await server.stop(0)
        return result

    return asyncio.run(main())


SERVERS = {"sync": sync_server, "aio": aio_server, "hotmerge": hotmerge_server}


def measure(args, streams: int, deliver) -> dict:
    engine = Engine(args, deliver)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    engine_cpu = []
    thread = threading.Thread(target=lambda: (engine.run(), engine_cpu.append(time.thread_time())))
    thread.start()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime - engine_cpu[0]
    periods = sorted(engine.periods[10:])  # past the first steps
    ideal = args.device_ms + args.engine_py_ms
    p50 = statistics.median(periods)
    return {
        "streams": streams,
        "step_ms_p50": round(p50, 3),
        "step_ms_p99": round(periods[int(0.99 * (len(periods) - 1))], 3),
        "lateness_ms_p50": round(p50 - ideal, 3),
        "server_cpu_us_per_message": round(cpu_s / (streams * args.steps) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="32,64")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device-ms", type=float, default=8.0)
    parser.add_argument("--engine-py-ms", type=float, default=1.0)
    parser.add_argument("--engine-releases", type=int, default=20)
    parser.add_argument("--servers", default="sync,aio,hotmerge")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print(f"engine step: {args.device_ms} ms device + {args.engine_py_ms} ms Python in "
          f"{args.engine_releases} pieces; {platform.node()}, {mp.cpu_count()} CPUs")  # fmt: skip
    # The engine alone (no server, no streams): the lateness of its own sleeps and releases.
    rows.append({"server": "none", **measure(args, 1, lambda step: None)})
    print(json.dumps(rows[-1]))
    for streams in (int(s) for s in args.streams.split(",")):
        for name in args.servers.split(","):
            row = {"server": name, **SERVERS[name](args, streams)}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "cpus": mp.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
