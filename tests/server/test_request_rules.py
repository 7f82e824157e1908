"""The request rule book (``hotmerge.request_rules``), one rule at a time and without a server:
each bad request is refused with a message naming the client's field, and a good one gives its
prompt's token ids. The fronts' end-to-end answers are in test_grpc.py and test_http.py."""

from __future__ import annotations

import time

import pytest
from hotmerge import request_rules as rules
from hotmerge.api import lorax, openai
from hotmerge.errors import InvalidArgument
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge.merging.spec import parse_merge_spec
from hotmerge.request_rules import RequestLimits
from hotmerge.v1 import hotmerge_pb2 as pb

LIMITS = RequestLimits(
    max_input_tokens=8,
    max_total_tokens=12,
    kv_capacity_tokens=10,
    vocab_size=300,
    max_lora_rank=16,
    default_max_new_tokens=4,
)


def encode(text: str) -> list[int]:
    return list(text.encode())  # one token per byte, ids < 256


def request(inputs="hi", input_ids=None, adapter_id=None, **params) -> GenerationRequest:
    params.setdefault("max_new_tokens", 2)
    return GenerationRequest(inputs, SamplingParams(**params), adapter_id, input_ids)


def refused(req: GenerationRequest, wire=rules.GRPC, limits=LIMITS, merged=False) -> str:
    with pytest.raises(InvalidArgument) as err:
        rules.validate(req, limits, encode, wire=wire, merged=merged)
    return str(err.value)


# (id: request, the wire it came from, text the message must hold)
G, LORAX = rules.GRPC, lorax.WIRE
OAI, CHAT = openai.COMPLETIONS_WIRE, openai.CHAT_WIRE
CASES = [
    pytest.param(
        request(max_new_tokens=-1),
        G,
        "parameters.max_new_tokens must be >= 0",
        id="max_new_tokens negative",
    ),
    pytest.param(
        request(max_new_tokens=2.5), G, "parameters.max_new_tokens", id="max_new_tokens not an int"
    ),
    pytest.param(
        request(max_new_tokens=0),
        G,
        "set parameters.prompt_logprobs",
        id="0 tokens without prompt_logprobs",
    ),
    pytest.param(
        request(max_new_tokens=0, prompt_logprobs=True),
        LORAX,
        "parameters.max_new_tokens must be >= 1",
        id="0 tokens over LoRAX",
    ),
    pytest.param(
        request(max_new_tokens=0, prompt_logprobs=True),
        CHAT,
        "max_tokens must be >= 1",
        id="0 tokens in a chat",
    ),
    pytest.param(
        request(max_new_tokens=0),
        OAI,
        "max_tokens is 0, which only scores the prompt: set echo",
        id="0 tokens without echo",
    ),
    pytest.param(
        request(temperature=-0.5),
        G,
        "parameters.temperature must be a finite number >= 0",
        id="temperature negative",
    ),
    pytest.param(
        request(temperature=float("nan")), OAI, "temperature must be a finite", id="temperature nan"
    ),
    pytest.param(request(temperature=1e-6), G, "or >= 0.001", id="temperature tiny"),
    pytest.param(
        request(top_p=0.0), G, "parameters.top_p must be in (0, 1], got 0.0", id="top_p zero"
    ),
    pytest.param(request(top_p=1.5), OAI, "top_p must be in (0, 1], got 1.5", id="top_p over 1"),
    pytest.param(request(top_k=-1), G, "parameters.top_k must be >= 0", id="top_k negative"),
    pytest.param(
        request(repetition_penalty=0.0),
        G,
        "parameters.repetition_penalty",
        id="repetition_penalty zero",
    ),
    pytest.param(
        request(repetition_penalty=float("inf")),
        G,
        "finite number > 0",
        id="repetition_penalty inf",
    ),
    pytest.param(request(seed=-1), OAI, "seed must be in [0, 2**64)", id="seed negative"),
    pytest.param(
        request(seed=2**64), G, "parameters.seed must be in [0, 2**64)", id="seed too large"
    ),
    pytest.param(
        request(stop=("s",) * 17),
        G,
        "parameters.stop has 17 sequences; give at most 16",
        id="too many stops",
    ),
    pytest.param(
        request(stop=("ok", "")), OAI, "stop must not contain empty strings", id="empty stop"
    ),
    pytest.param(request(adapter_id=""), G, "adapter_id is empty", id="adapter_id empty"),
    pytest.param(
        request(adapter_id=""),
        LORAX,
        "parameters.adapter_id is empty",
        id="adapter_id empty over LoRAX",
    ),
    pytest.param(request(inputs=None), G, "inputs is empty", id="no prompt"),
    pytest.param(request(inputs=None), OAI, "prompt is empty", id="no prompt over OpenAI"),
    pytest.param(
        request(input_ids=(1, 2)),
        G,
        "give inputs (text) or input_ids (token ids), not both",
        id="text and ids",
    ),
    pytest.param(request(inputs=b"hi"), G, "inputs must be a string", id="inputs not text"),
    pytest.param(
        request(inputs=None, input_ids=(1, 300)),
        G,
        "input_ids: 300 is not a token id of this model (0 <= id < 300)",
        id="id outside the vocabulary",
    ),
    pytest.param(
        request(inputs=None, input_ids=(-1,)),
        OAI,
        "prompt: -1 is not a token id",
        id="id outside the vocabulary over OpenAI",
    ),
    pytest.param(
        request(inputs=""),
        G,
        "inputs is empty (it must give at least one token)",
        id="text of no tokens",
    ),
    pytest.param(
        request(inputs="x" * 9),
        G,
        "inputs is 9 tokens, more than max_input_tokens=8",
        id="too many tokens",
    ),
    pytest.param(
        request(inputs=None, input_ids=(1,) * 9),
        CHAT,
        "messages is 9 tokens",
        id="too many ids in a chat",
    ),
    pytest.param(
        request(inputs="x" * 8, max_new_tokens=5),
        G,
        "max_total_tokens is 12: give max_new_tokens <= 4",
        id="over max_total_tokens",
    ),
    pytest.param(
        request(inputs="x" * 8, max_new_tokens=5),
        OAI,
        "give max_tokens <= 4",
        id="over max_total_tokens over OpenAI",
    ),
    pytest.param(
        request(inputs="x" * 6, max_new_tokens=5),
        G,
        "needs up to 11 tokens of KV cache (prompt 6 + max_new_tokens 5), more than the cache's 10",
        id="over the KV cache",
    ),
]


@pytest.mark.parametrize(("req", "wire", "text"), CASES)
def test_each_rule_refuses_with_the_clients_field(req, wire, text):
    assert text in refused(req, wire)


def test_a_good_request_gives_its_prompt_ids():
    assert rules.validate(request("hi"), LIMITS, encode) == [104, 105]
    assert rules.validate(request(None, (7, 8)), LIMITS, encode) == [7, 8]
    scoring = request("hi", max_new_tokens=0, prompt_logprobs=True)
    assert rules.validate(scoring, LIMITS, encode) == [104, 105]  # gRPC scores a prompt
    assert rules.validate(scoring, LIMITS, encode, wire=openai.COMPLETIONS_WIRE) == [104, 105]
    # At the limits exactly: 8 prompt tokens + 2 fit 10 of KV cache and 12 in all.
    assert len(rules.validate(request("x" * 8, max_new_tokens=2), LIMITS, encode)) == 8


def test_a_huge_prompt_is_refused_before_tokenizing():
    def never(text):
        pytest.fail("tokenized")

    huge = "a" * (LIMITS.max_input_tokens * rules.MAX_BYTES_PER_TOKEN + 1)
    with pytest.raises(InvalidArgument, match="513 bytes, more than can fit max_input_tokens=8"):
        rules.validate(request(huge), LIMITS, never)


def test_adapter_id_and_an_inline_merge_are_one_or_the_other():
    message = refused(request(adapter_id="a"), merged=True)
    assert message == "give adapter_id or merged_adapters, not both"
    rules.validate(request(), LIMITS, encode, merged=True)


def test_messages_name_the_default_for_an_unset_max_new_tokens():
    assert "server default of 4" in refused(request(max_new_tokens=-3))


# -- merge specs: the same rule for Merge and Generate ------------------------------------------


def spec(**fields):
    return parse_merge_spec(pb.MergedAdapters(ids=["a", "b"], **fields), max_adapters=None)


def test_svd_rank_must_fit_an_adapter_slot():
    rules.check_merge_spec(spec(merge_strategy=pb.TIES_SVD, svd_rank=16), LIMITS)
    with pytest.raises(
        InvalidArgument, match=r"merged_adapters.svd_rank is 17, .* give svd_rank <= 16"
    ):
        rules.check_merge_spec(spec(merge_strategy=pb.TIES_SVD, svd_rank=17), LIMITS)
    unlimited = RequestLimits(8, 12, 10, 300, max_lora_rank=None)  # slots of any rank
    rules.check_merge_spec(spec(merge_strategy=pb.TIES_SVD, svd_rank=1000), unlimited)
    rules.check_merge_spec(spec(merge_strategy=pb.TIES), LIMITS)  # no svd_rank: nothing to check


def test_merged_adapter_rank_must_fit_an_adapter_slot():
    rules.check_adapter_rank(16, LIMITS, "merged adapter m-1")
    with pytest.raises(InvalidArgument, match="merged adapter m-1: rank 24 is more than .* 16"):
        rules.check_adapter_rank(24, LIMITS, "merged adapter m-1")
    assert rules.rank_problem(24, None) is None and "--max-lora-rank" in rules.rank_problem(24, 16)


def test_queue_deadline_is_the_earlier_of_the_request_and_the_server_maximum():
    now = time.monotonic()
    assert rules.queue_deadline(None, now) == now + rules.MAX_QUEUE_WAIT_S
    assert rules.queue_deadline(now + 1, now) == now + 1
    assert rules.queue_deadline(now + 1e6, now) == now + rules.MAX_QUEUE_WAIT_S
