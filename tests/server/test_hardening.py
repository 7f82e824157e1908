"""Issue 12: hostile but ordinary input gets a clear status, never INTERNAL; every wait ends by
the deadline; the server keeps serving. One in-process server on a tiny Llama, small budgets."""

from __future__ import annotations

import gc
import json
import logging
import struct
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from hotmerge.client import HotmergeClient, generate_request
from hotmerge.server import start_server
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge_kernels.layout import FlatAdapter
from safetensors.torch import load_file, save_file

from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

Code = grpc.StatusCode
GOOD = ("good-a", "good-b", "good-c")
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# -- hostile adapter folders ------------------------------------------------------------------


def st_file(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def good_tensors(root) -> dict[str, torch.Tensor]:
    return load_file(str(root / "good-a" / WEIGHTS))


def header_of(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


def _edit_header(root, edit) -> bytes:
    header, data = header_of(good_tensors(root))
    first = next(iter(header))
    edit(header, first)
    return st_file(header, data)


def _with_value(root, value: float) -> bytes:
    tensors = good_tensors(root)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    header, data = header_of(tensors)
    return st_file(header, data)


def _as_dtype(root, dtype: torch.dtype, name: str) -> bytes:
    tensors = good_tensors(root)
    header, data = {}, b""
    for key, t in tensors.items():
        raw = (t * 10).to(dtype).contiguous().numpy().tobytes()
        header[key] = {
            "dtype": name,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return st_file(header, data)


def _overlap(header, first):
    second = list(header)[1]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])


def _past_end(header, first):
    begin, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [begin + 10**9, end + 10**9]


def _overflowing_shape(header, first):
    header[first]["shape"] = [2**40, 2**40]


def _three_d(header, first):
    header[first]["shape"] = [1, *header[first]["shape"]]


# name -> (weights bytes or None to keep, config changes or None, text the message must hold)
WEIGHTS_CASES = {
    "truncated": (
        lambda r: (r / "good-a" / WEIGHTS).read_bytes()[:200],
        "adapter_model.safetensors",
    ),
    "eight-bytes": (lambda r: (r / "good-a" / WEIGHTS).read_bytes()[:8], "header"),
    "empty": (lambda r: b"", "too short"),
    "header-2e60": (lambda r: struct.pack("<Q", 2**60) + b"{}", "declares a header"),
    "header-100mb": (lambda r: struct.pack("<Q", 100 << 20) + b"{}" * 10, "declares a header"),
    "not-json": (lambda r: struct.pack("<Q", 6) + b"\xff\xfe{]:x", "not JSON"),
    "past-end": (lambda r: _edit_header(r, _past_end), "outside the"),
    "overlapping": (lambda r: _edit_header(r, _overlap), "overlaps"),
    "shape-overflow": (lambda r: _edit_header(r, _overflowing_shape), "needs"),
    "three-d": (lambda r: _edit_header(r, _three_d), "2-D"),
    "pickle": (lambda r: b"\x80\x04\x95" + b"\x00" * 64 + b"cos\nsystem\n", "declares a header"),
    "zeros": (lambda r: b"\x00" * (2 << 20), "not JSON"),
    "f64": (lambda r: _as_dtype(r, torch.float64, "F64"), "dtype 'F64'"),
    "int8": (lambda r: _as_dtype(r, torch.int8, "I8"), "dtype 'I8'"),
    "uint8": (lambda r: _as_dtype(r, torch.uint8, "U8"), "dtype 'U8'"),
    "int64": (lambda r: _as_dtype(r, torch.int64, "I64"), "dtype 'I64'"),
    "bool": (lambda r: _as_dtype(r, torch.bool, "BOOL"), "dtype 'BOOL'"),
    "nan": (lambda r: _with_value(r, float("nan")), "NaN or infinite"),
    "inf": (lambda r: _with_value(r, float("inf")), "NaN or infinite"),
    "huge-3e38": (lambda r: _with_value(r, 3e38), "larger than"),
}
CONFIG_CASES = {
    "deep-config": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    "big-config": (" " * (2 << 20) + "{}", "larger than"),
    "targets-5": ({"target_modules": 5}, "target_modules"),
    "rank-2e64": ({"r": 2**64}, "r must be an integer"),
    "rank-true": ({"r": True}, "r must be an integer"),
    "alpha-nan": ("NaN", "lora_alpha"),
    "alpha-inf": ("Infinity", "lora_alpha"),
    "alpha-1e308": ({"lora_alpha": 1e308}, "lora_alpha"),
}
HOSTILE = {**WEIGHTS_CASES, **CONFIG_CASES}


def build_hostile(root) -> None:
    good = root / "good-a"
    for name, (make, _) in WEIGHTS_CASES.items():
        folder = root / name
        folder.mkdir()
        (folder / CONFIG).write_bytes((good / CONFIG).read_bytes())
        (folder / WEIGHTS).write_bytes(make(root))
    config = json.loads((good / CONFIG).read_text())
    for name, (change, _) in CONFIG_CASES.items():
        folder = root / name
        folder.mkdir()
        (folder / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes())
        if isinstance(change, dict):
            text = json.dumps({**config, **change})
        elif name.startswith("alpha-"):  # JSON's non-standard NaN / Infinity, as Python writes
            text = json.dumps({**config, "lora_alpha": 1.0}).replace(
                '"lora_alpha": 1.0', f'"lora_alpha": {change}'
            )
        else:
            text = change
        (folder / CONFIG).write_text(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harden")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    for i, name in enumerate(GOOD):
        make_peft_adapter(model_dir, root / name, r=4, alpha=8, seed=i + 1)
    size = 4 * sum(t.numel() for t in load_file(str(root / "good-a" / WEIGHTS)).values())
    build_hostile(root)
    config = tiny_server_config(
        tmp,
        model_dir,
        root,
        max_input_tokens=64,
        default_max_new_tokens=8,
        adapter_budget_bytes=int(2.5 * size),  # two adapters at once, never three
        merge_budget_bytes=int(1.5 * size),  # one merged adapter
        max_wait_s=2.0,
        max_workers=8,
        http_port=0,
    )
    server = start_server(config)
    yield server, size
    server.stop(0)


@pytest.fixture(scope="module")
def server(setup):
    return setup[0]


@pytest.fixture(scope="module")
def client(server):
    with HotmergeClient(server.target, timeout=30) as client:
        yield client


def status(call) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


def assert_serving(client) -> None:
    assert client.generate("hi", adapter_id="good-a", max_new_tokens=2).generated_tokens == 2


# -- (1) (3) (14): hostile adapters ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_adapter_is_invalid_argument_everywhere(client, name):
    text = HOSTILE[name][1]
    file = WEIGHTS if name in WEIGHTS_CASES else CONFIG
    calls = {
        "LoadAdapter": lambda: client.load_adapter(name),
        "Generate": lambda: client.generate("hi", adapter_id=name, max_new_tokens=2),
        "Merge": lambda: client.merge({"ids": ["good-a", name], "merge_strategy": "LINEAR"}),
    }
    for rpc, call in calls.items():
        code, details = status(call)
        assert code == Code.INVALID_ARGUMENT, (rpc, code, details)
        assert file in details and text in details and name in details, (rpc, details)
    listed = {a.id for a in client.list_adapters()}
    assert set(GOOD) <= listed  # a bad folder never hides the good ones
    assert_serving(client)


def test_listing_reads_headers_only(server, client, monkeypatch):
    from hotmerge.adapters import files as adapter_files

    monkeypatch.setattr(adapter_files, "read_tensors", lambda *a: pytest.fail("read weights"))
    listed = {a.id: a for a in client.list_adapters()}
    assert set(GOOD) <= set(listed) and listed["good-c"].bytes > 0


def test_adapter_over_the_budget_is_refused_before_reading(server, client, monkeypatch, tmp_path):
    from hotmerge.adapters import files as adapter_files

    root = server.config.adapter_root
    big = root / "too-big"
    if not big.exists():
        big.mkdir()
        tensors = {k: t.repeat(1, 1) for k, t in good_tensors(root).items()}
        (big / CONFIG).write_bytes((root / "good-a" / CONFIG).read_bytes())
        config = json.loads((big / CONFIG).read_text())
        config["r"] = 16
        (big / CONFIG).write_text(json.dumps(config))
        wide = {}
        for k, t in tensors.items():
            wide[k] = t.repeat(4, 1) if "lora_A" in k else t.repeat(1, 4)
        save_file({k: v.contiguous() for k, v in wide.items()}, str(big / WEIGHTS))
    monkeypatch.setattr(adapter_files, "read_tensors", lambda *a: pytest.fail("read weights"))
    code, details = status(lambda: client.load_adapter("too-big"))
    assert code == Code.RESOURCE_EXHAUSTED and "more than the whole adapter budget" in details


# -- (2) ids, (4) weights, (5) temperature, (17) prompts, max_new_tokens -----------------------


def test_long_id_part_is_refused_and_not_echoed_whole(client, caplog):
    long_id = "x" * 300
    for call in (
        lambda: client.load_adapter(long_id),
        lambda: client.generate("hi", adapter_id=long_id),
        lambda: client.load_adapter("org/" + long_id),
    ):
        code, details = status(call)
        assert code == Code.INVALID_ARGUMENT and "at most 255" in details
        assert long_id not in details
    assert all(long_id not in r.getMessage() for r in caplog.records)
    assert_serving(client)


def test_absurd_merge_weights_are_refused(client):
    spec = {"ids": ["good-a", "good-b"], "weights": [3.4e38, 3.4e38], "merge_strategy": "LINEAR"}
    code, details = status(lambda: client.merge(spec))
    assert code == Code.INVALID_ARGUMENT and "weights[0]" in details and "within" in details
    assert_serving(client)


@pytest.mark.parametrize("temperature", [1e-45, 1e-6])
def test_tiny_temperature_is_refused(client, temperature):
    code, details = status(lambda: client.generate("hi", temperature=temperature))
    assert code == Code.INVALID_ARGUMENT and "temperature" in details and "0.001" in details
    assert_serving(client)


def test_huge_prompt_is_refused_before_tokenizing(server, client, monkeypatch):
    runner = server.engine.runner
    monkeypatch.setattr(runner, "encode", lambda text: pytest.fail("tokenized"))
    start = time.monotonic()
    code, details = status(lambda: client.generate("a" * 3_900_000))
    assert code == Code.INVALID_ARGUMENT and "3900000 bytes" in details
    assert "max_input_tokens=64" in details and time.monotonic() - start < 3


def test_max_new_tokens_over_the_limit_is_refused_with_the_limit(server, client):
    total = server.engine.max_total_tokens
    code, details = status(lambda: client.generate("hi", max_new_tokens=total + 5))
    assert code == Code.INVALID_ARGUMENT and "max_new_tokens" in details
    assert f"max_total_tokens is {total}" in details and "give max_new_tokens <=" in details


# -- (6) malformed protobuf ------------------------------------------------------------------


def raw_call(server, method: str, data: bytes, *, stream: bool = False):
    with grpc.insecure_channel(server.target) as channel:
        path = f"/hotmerge.v1.Hotmerge/{method}"
        ident = lambda b: b  # noqa: E731
        if stream:
            call = channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)
            return status(lambda: list(call(data, timeout=10)))
        call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
        return status(lambda: call(data, timeout=10))


def _with_bad_utf8(msg, field_bytes: bytes, replacement: bytes) -> bytes:
    data = msg.SerializeToString()
    assert field_bytes in data
    return data.replace(field_bytes, replacement)


def test_malformed_requests_are_invalid_argument(server, client):
    good = generate_request("hello", adapter_id="good-a", stop=["zz"]).SerializeToString()
    cases = {
        "truncated": ("Generate", good[:-3]),
        "utf8-inputs": (
            "Generate",
            _with_bad_utf8(pb.GenerateRequest(inputs="hello"), b"hello", b"h\xffllo"),
        ),
        "utf8-id": (
            "LoadAdapter",
            _with_bad_utf8(pb.LoadAdapterRequest(adapter_id="abc"), b"abc", b"a\xc3c"),
        ),
        "utf8-stop": ("Generate", good.replace(b"zz", b"\xfe\xff")),
        "stream": ("GenerateStream", good[:-3]),
        "garbage": ("Merge", b"\xff" * 7),
    }
    for name, (method, data) in cases.items():
        code, details = raw_call(server, method, data, stream=method == "GenerateStream")
        assert code == Code.INVALID_ARGUMENT, (name, code, details)
        assert "not a valid protobuf message" in details, (name, details)
    assert raw_call(server, "Info", b"")[0] == Code.OK
    assert_serving(client)


# -- (9) (15) waits bounded by the deadline and the server maximum -----------------------------


def fill_merge_cache(server, size):
    """Pin a merged entry that takes the whole merge budget (a long request holding it)."""
    cache = server.service.merger.cache
    buffer = torch.ones(int(1.4 * size) // 4)
    adapter = FlatAdapter(buffer, (), rank=4, scaling=1.0)
    return cache, cache.acquire("m-held-by-a-long-request", lambda: adapter).entry


def test_merge_waiting_for_room_ends_by_its_deadline_and_info_is_not_starved(setup, client):
    server, size = setup
    cache, held = fill_merge_cache(server, size)
    try:
        spec = {"ids": ["good-a", "good-b"], "merge_strategy": "LINEAR", "weights": [0.3, 0.2]}
        with ThreadPoolExecutor(12) as pool:
            start = time.monotonic()
            merges = [
                pool.submit(status, lambda: client.merge(spec, timeout=1.0)) for _ in range(6)
            ]
            time.sleep(0.2)
            info_start = time.monotonic()
            assert client.info(timeout=5).model_id
            info_s = time.monotonic() - info_start
            results = [f.result() for f in merges]
            elapsed = time.monotonic() - start
        assert info_s < 1.0  # the waiting merges do not hold every worker
        assert all(code == Code.DEADLINE_EXCEEDED for code, _ in results), results
        assert elapsed < 1.0 + 1.5  # the deadline plus a margin, not the server maximum
        # Without a deadline: the server maximum (max_wait_s=2), then RESOURCE_EXHAUSTED.
        start = time.monotonic()
        code, details = status(lambda: client.merge(spec, timeout=None))
        assert code == Code.RESOURCE_EXHAUSTED and "server maximum of 2 s" in details
        assert time.monotonic() - start < 2.0 + 1.5
    finally:
        cache.release(held)
        cache.clear()
    assert client.merge(spec).bytes > 0  # room again: it merges
    assert_serving(client)


def test_merge_whose_inputs_can_never_fit_says_so(client):
    spec = {"ids": list(GOOD), "merge_strategy": "LINEAR"}
    code, details = status(lambda: client.merge(spec))
    assert code == Code.RESOURCE_EXHAUSTED and "can never run here" in details
    assert "retry" not in details
    assert_serving(client)


# -- (11) (12) deadlines mid-merge, cancelled streams, metrics ----------------------------------


def requests_total(server, method: str, code: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "hotmerge_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


@pytest.fixture
def slow_merges(monkeypatch):
    """Merges of many slow chunks, polling the real cancel callback between them."""
    from hotmerge.merging import merger as merging
    from hotmerge_kernels.merge import reference

    monkeypatch.setitem(reference._CHUNK, "cpu", 64)
    real = merging.merge_adapters
    stopped = []

    def slow(adapters, params, *, cancel=None, **kw):
        def poll():
            time.sleep(0.05)
            gone = cancel()
            stopped.extend([time.monotonic()] if gone else [])
            return gone

        return real(adapters, params, cancel=poll, **kw)

    monkeypatch.setattr(merging, "merge_adapters", slow)
    return stopped


def test_deadline_mid_merge_is_deadline_exceeded_without_a_traceback(
    server, client, slow_merges, caplog
):
    before = requests_total(server, "Merge", "DEADLINE_EXCEEDED")
    internal = requests_total(server, "Merge", "INTERNAL")
    spec = {"ids": ["good-a", "good-b"], "merge_strategy": "TIES", "density": 0.5, "seed": 7}
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        code, _ = status(lambda: client.merge(spec, timeout=1.0))
    assert code == Code.DEADLINE_EXCEEDED and time.monotonic() - start < 2.5
    deadline = time.monotonic() + 5
    while not slow_merges and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_merges and slow_merges[0] - start < 2.5  # the merge itself stopped
    while requests_total(server, "Merge", "DEADLINE_EXCEEDED") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert requests_total(server, "Merge", "INTERNAL") == internal
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_serving(client)


def test_cancelled_stream_is_counted(server, client):
    before = requests_total(server, "GenerateStream", "CANCELLED")
    stream = client.generate_stream("hello", adapter_id="good-a", max_new_tokens=150)
    next(iter(stream))
    stream.cancel()
    deadline = time.monotonic() + 10
    while requests_total(server, "GenerateStream", "CANCELLED") == before:
        assert time.monotonic() < deadline, "the cancelled stream was never counted"
        time.sleep(0.05)
    seconds = server.metrics.registry.get_sample_value(
        "hotmerge_request_seconds_count", {"method": "GenerateStream"}
    )
    assert seconds and seconds >= 1
    assert_serving(client)


# -- (8) memory back on unload -------------------------------------------------------------------


def test_unload_leaves_no_reference_to_the_weights(server, client):
    client.unload_adapter("good-c")
    client.generate("hi", adapter_id="good-c", max_new_tokens=2)
    spec = {"ids": ["good-a", "good-c"], "merge_strategy": "TIES", "density": 0.7}
    client.generate("hi", merged_adapters=spec, max_new_tokens=2)
    store = server.store
    ref = weakref.ref(store._lru.peek("good-c").weights.buffer)
    server.service.merger.cache.clear()
    deadline = time.monotonic() + 5
    while not client.unload_adapter("good-c"):  # the request's pin goes when its row ends
        assert time.monotonic() < deadline
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert_serving(client)


# -- shutdown never waits on a merge past the grace ----------------------------------------------


def test_stop_ends_a_running_merge(setup, slow_merges, tmp_path):
    server, _ = setup
    config = tiny_server_config(
        tmp_path, server.config.model, server.config.adapter_root, http_port=None
    )
    other = start_server(config)
    with HotmergeClient(other.target, timeout=60) as c:
        spec = {"ids": ["good-a", "good-b"], "merge_strategy": "TIES", "density": 0.4}
        result: list = []
        t = threading.Thread(target=lambda: result.append(status(lambda: c.merge(spec))))
        t.start()
        time.sleep(1.0)  # the merge is running now (each chunk takes 50 ms)
        start = time.monotonic()
        other.stop(0.5)
        stop_s = time.monotonic() - start
        t.join(30)  # the client may retry elsewhere (UNAVAILABLE) before giving up
    assert stop_s < 2.0  # the grace, then the merge stops at its next chunk
    assert slow_merges and slow_merges[0] - start < 1.5
    assert not t.is_alive() and result and result[0][0] != Code.OK


def test_startup_objects_are_frozen_out_of_the_collector():
    """`hotmerge serve` freezes what start-up loaded, so full collections skip it; garbage made
    before is collected first, not frozen."""
    from hotmerge.server import freeze_startup_objects

    class Cycle:
        pass

    loaded, garbage = Cycle(), Cycle()
    loaded.me, garbage.me = loaded, garbage
    gone = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        assert gone() is None
        assert gc.get_freeze_count() > before
        assert all(o is not loaded for o in gc.get_objects(generation=2))  # frozen instead
    finally:
        gc.unfreeze()
