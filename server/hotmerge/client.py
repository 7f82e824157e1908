"""Python clients of a hotmerge server: ``HotmergeClient`` (blocking) and ``AsyncHotmergeClient``.

Both return the protobuf messages of ``hotmerge.v1`` and raise ``grpc.RpcError`` (``.code()``,
``.details()``) when the server answers with an error::

    with HotmergeClient("localhost:50051") as client:
        reply = client.generate("hello", adapter_id="demo-a", max_new_tokens=16)
        print(reply.generated_text, reply.timings.total_ms)
        for msg in client.generate_stream("hello", temperature=0.7, seed=1):
            print(msg.text, end="")

A request with ``merged_adapters`` carries the spec's affinity key as ``x-merge-key`` metadata,
so a load balancer that hashes on it sends one spec to one replica (and its merge cache).

Calls that fail with UNAVAILABLE (a replica still loading, draining or gone) are retried by
gRPC itself (``RETRY_POLICY``: up to 5 attempts, jittered exponential backoff, and a retry
budget per channel that stops retrying when most calls fail); ``retry=False`` turns that off.
``target`` may list several replicas, ``"127.0.0.1:50051,127.0.0.1:50052"``: gRPC then spreads
calls over them round-robin and skips those it cannot reach (IPv4/IPv6 literals only).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import grpc

from hotmerge.errors import HotmergeError
from hotmerge.headers import AUTHORIZATION_HEADER, MERGE_KEY_HEADER
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Hotmerge"].full_name

# gRPC's retry policy (https://github.com/grpc/proposal/blob/master/A6-client-retries.md).
# Attempt n waits a random time in [0, min(initial * multiplier**(n-1), max)], so the four
# retries together wait 1.2 s on average and 2.75 s at most: longer than a balancer takes to
# see a draining replica fail its health check and rehash its keys elsewhere.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.25s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# The budget: each failure takes a token, each success gives back 0.1; below half of
# maxTokens the channel stops retrying (so a dead fleet is not hammered 5x).
RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}


def channel_target(target: str) -> str:
    """``target`` as gRPC takes it: several comma-separated addresses become one ipv4:/ipv6: URI."""
    if "," not in target or target.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        return target
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:" + ",".join(addresses)


def channel_options(target: str, *, retry: bool = True) -> list[tuple[str, object]]:
    """Channel arguments: retries on UNAVAILABLE, round-robin over several targets."""
    config: dict[str, object] = {}
    if retry:
        config["methodConfig"] = [
            {"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}
        ]
        config["retryThrottling"] = RETRY_THROTTLING
    if "," in target:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    options: list[tuple[str, object]] = [("grpc.enable_retries", int(retry))]
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    return options


class GenerateOptions(TypedDict, total=False):
    """Keyword options of generate(); a None value means unset (the server's default)."""

    adapter_id: str | None  # no adapter and no merged_adapters: the base model
    merged_adapters: pb.MergedAdapters | Mapping[str, Any] | None  # fields of MergedAdapters
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    do_sample: bool | None
    seed: int | None
    repetition_penalty: float | None
    stop: Sequence[str] | None
    details: bool | None
    prompt_logprobs: bool | None  # also return each prompt token's logprob (reply.prompt)


_PARAMETER_NAMES = set(GenerateOptions.__annotations__) - {"adapter_id", "merged_adapters"}


def generate_request(
    inputs: str | Sequence[int], **options: Unpack[GenerateOptions]
) -> pb.GenerateRequest:
    """``inputs`` is the prompt text, or its token ids (sent as ``input_ids``, used as given)."""
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        names = ", ".join(sorted(GenerateOptions.__annotations__))
        raise TypeError(f"unknown generate option(s) {sorted(unknown)}; known: {names}")
    adapter_id, merged = options.get("adapter_id"), options.get("merged_adapters")
    if adapter_id is not None and merged is not None:
        raise ValueError("give adapter_id or merged_adapters, not both")
    params = {k: v for k, v in options.items() if k in _PARAMETER_NAMES and v is not None}
    request = pb.GenerateRequest(parameters=pb.GenerationParameters(**params))
    if isinstance(inputs, str):
        request.inputs = inputs
    else:
        request.input_ids.extend(inputs)
    if adapter_id is not None:
        request.adapter_id = adapter_id
    elif merged is not None:
        request.merged_adapters.CopyFrom(_spec_message(merged))
    return request


def merge_request(
    merged_adapters: pb.MergedAdapters | Mapping[str, Any], name: str = ""
) -> pb.MergeRequest:
    return pb.MergeRequest(merged_adapters=_spec_message(merged_adapters), name=name)


def _spec_message(spec: pb.MergedAdapters | Mapping[str, Any]) -> pb.MergedAdapters:
    """A mapping takes the message's field names; strategy names in any case ("ties")."""
    if not isinstance(spec, Mapping):
        return spec
    from hotmerge.merging.spec import merged_adapters_from_dict

    return merged_adapters_from_dict(spec)


def spec_metadata(spec: pb.MergedAdapters) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a merge spec: its affinity key, for a balancer to hash on."""
    from hotmerge.merging.spec import affinity_key  # only requests with a spec need it

    try:
        return ((MERGE_KEY_HEADER, affinity_key(spec)),)
    except HotmergeError:  # an invalid spec: the server names the problem
        return ()


def request_metadata(request: pb.GenerateRequest) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for ``request``: the merge spec's affinity key, if it has a spec."""
    if request.WhichOneof("adapter") != "merged_adapters":
        return ()
    return spec_metadata(request.merged_adapters)


class ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer KEY`` to every call (a server started with --api-key)."""

    def __init__(self, key: str) -> None:
        self._header = (AUTHORIZATION_HEADER, f"Bearer {key}")

    def _details(self, details):
        metadata = (*(details.metadata or ()), self._header)
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class HotmergeClient:
    """Blocking client. ``timeout`` (seconds) is the default deadline of every call; it bounds
    all retries of a call together. ``retry``: retry UNAVAILABLE (``RETRY_POLICY``)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        retry: bool = True,
        api_key: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(
            channel_target(target), options=channel_options(target, retry=retry)
        )
        if api_key:
            self._channel = grpc.intercept_channel(self._channel, ApiKey(api_key))
        self._stub = pb_grpc.HotmergeStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def generate(
        self,
        inputs: str | Sequence[int],
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        request = generate_request(inputs, **options)
        return self._stub.Generate(
            request, timeout=self._timeout(timeout), metadata=request_metadata(request)
        )

    def generate_stream(
        self,
        inputs: str | Sequence[int],
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[pb.GenerateStreamResponse]:
        """One message per token, then one with ``done``. The returned call has ``cancel()``."""
        request = generate_request(inputs, **options)
        return self._stub.GenerateStream(
            request, timeout=self._timeout(timeout), metadata=request_metadata(request)
        )

    def merge(
        self,
        merged_adapters: pb.MergedAdapters | Mapping[str, Any],
        *,
        name: str = "",
        replace: bool = False,
        timeout: float | None = None,
    ) -> pb.MergeResponse:
        """Merge a spec without generating (warms the server's merge cache); with ``name``,
        also register it as a named merge, usable wherever an adapter id is (a name already
        registered only with ``replace``)."""
        request = merge_request(merged_adapters, name)
        request.replace = replace
        return self._stub.Merge(
            request, timeout=self._timeout(timeout), metadata=spec_metadata(request.merged_adapters)
        )

    def info(self, *, timeout: float | None = None) -> pb.InfoResponse:
        return self._stub.Info(pb.InfoRequest(), timeout=self._timeout(timeout))

    def list_adapters(self, *, timeout: float | None = None) -> list[pb.AdapterInfo]:
        reply = self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self._timeout(timeout))
        return list(reply.adapters)

    def list_merges(self, *, timeout: float | None = None) -> pb.ListMergesResponse:
        """The merged adapters the server's merge cache holds, most recently used first."""
        return self._stub.ListMerges(pb.ListMergesRequest(), timeout=self._timeout(timeout))

    def load_adapter(
        self, adapter_id: str, *, timeout: float | None = None
    ) -> pb.LoadAdapterResponse:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id)
        return self._stub.LoadAdapter(request, timeout=self._timeout(timeout))

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        """True if it was loaded."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return self._stub.UnloadAdapter(request, timeout=self._timeout(timeout)).unloaded

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HotmergeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncHotmergeClient:
    """asyncio client (grpc.aio); the same methods as HotmergeClient, to be awaited."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        retry: bool = True,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.aio.insecure_channel(
            channel_target(target), options=channel_options(target, retry=retry)
        )
        self._stub = pb_grpc.HotmergeStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def generate(
        self,
        inputs: str | Sequence[int],
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        request = generate_request(inputs, **options)
        return await self._stub.Generate(
            request, timeout=self._timeout(timeout), metadata=request_metadata(request)
        )

    def generate_stream(
        self,
        inputs: str | Sequence[int],
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """``async for msg in client.generate_stream(...)``; the returned call has ``cancel()``."""
        request = generate_request(inputs, **options)
        return self._stub.GenerateStream(
            request, timeout=self._timeout(timeout), metadata=request_metadata(request)
        )

    async def merge(
        self,
        merged_adapters: pb.MergedAdapters | Mapping[str, Any],
        *,
        name: str = "",
        replace: bool = False,
        timeout: float | None = None,
    ) -> pb.MergeResponse:
        request = merge_request(merged_adapters, name)
        request.replace = replace
        return await self._stub.Merge(
            request, timeout=self._timeout(timeout), metadata=spec_metadata(request.merged_adapters)
        )

    async def info(self, *, timeout: float | None = None) -> pb.InfoResponse:
        return await self._stub.Info(pb.InfoRequest(), timeout=self._timeout(timeout))

    async def list_adapters(self, *, timeout: float | None = None) -> list[pb.AdapterInfo]:
        reply = await self._stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=self._timeout(timeout)
        )
        return list(reply.adapters)

    async def list_merges(self, *, timeout: float | None = None) -> pb.ListMergesResponse:
        return await self._stub.ListMerges(pb.ListMergesRequest(), timeout=self._timeout(timeout))

    async def load_adapter(
        self, adapter_id: str, *, timeout: float | None = None
    ) -> pb.LoadAdapterResponse:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id)
        return await self._stub.LoadAdapter(request, timeout=self._timeout(timeout))

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        reply = await self._stub.UnloadAdapter(request, timeout=self._timeout(timeout))
        return reply.unloaded

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncHotmergeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
