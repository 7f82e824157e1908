"""The HTTP fronts end to end, with the real client packages: a server in-process on free
loopback ports, a tiny Llama and PEFT adapters. HTTP answers are checked against the gRPC
service (one request path: the same greedy text), against the model itself (prompt logprobs)
and against each front's error shapes."""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import httpx
import lorax
import openai
import pytest
import torch
from hotmerge.api.core import generation_request
from hotmerge.client import HotmergeClient
from hotmerge.v1 import hotmerge_pb2 as pb
from hotmerge.v1 import hotmerge_pb2_grpc as pb_grpc

from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

PROMPT = "Once upon a time"
TOKENS = 10
# Same rank and targets, so PEFT's add_weighted_adapter("linear") is the reference merge.
SPEC = {"ids": ["ad-a", "ad-b"], "weights": [0.7, 0.5], "merge_strategy": "linear", "density": 1.0}
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, alpha=8, seed=1, scale=2.0)
    make_peft_adapter(model_dir, root / "ad-b", r=4, alpha=16, seed=2, scale=2.0)
    merges = tmp / "merges.json"
    merges.write_text('{"mix-file": {"ids": ["ad-a", "ad-b"], "weights": [0.7, 0.5]}}')
    config = tiny_server_config(
        tmp,
        model_dir,
        root,
        max_batch_size=4,
        max_input_tokens=64,
        default_max_new_tokens=TOKENS,
        merges_file=merges,
    )
    from hotmerge.server import start_server

    server = start_server(config)
    yield server, model_dir, root
    server.stop(0)


@pytest.fixture(scope="module")
def server(setup):
    return setup[0]


@pytest.fixture(scope="module")
def grpc_client(server):
    with HotmergeClient(server.target, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)


def grpc_text(client, prompt=PROMPT, **options) -> str:
    options.setdefault("max_new_tokens", TOKENS)
    return client.generate(prompt, **options).generated_text


def model_name(server) -> str:
    return server.engine.runner.model_id


def direct_logprobs(setup, ids: list[int], adapter: str | None) -> list[float]:
    """log p(ids[k] | ids[:k]) for k >= 1 from transformers (and PEFT) directly, fp32."""
    from transformers import AutoModelForCausalLM

    _, model_dir, root = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter == "mix":  # the named merge: PEFT's add_weighted_adapter with the same spec
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, root / "ad-a", adapter_name="ad-a")
        model.load_adapter(root / "ad-b", adapter_name="ad-b")
        model.add_weighted_adapter(["ad-a", "ad-b"], SPEC["weights"], "mix", "linear")
        model.set_adapter("mix")
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    return lp.squeeze(1).tolist()


# -- LoRAX REST through lorax-client ------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["ad-a", None])
def test_lorax_client_generate_equals_grpc(server, grpc_client, adapter):
    client = lorax.Client(server.http_url, timeout=60)
    reply = client.generate(
        PROMPT, adapter_id=adapter, max_new_tokens=TOKENS, details=True,
        decoder_input_details=True,
    )  # fmt: skip
    expected = grpc_client.generate(PROMPT, adapter_id=adapter, max_new_tokens=TOKENS, details=True)
    assert reply.generated_text == expected.generated_text
    d = reply.details
    assert [t.id for t in d.tokens] == [t.id for t in expected.tokens]
    assert [t.logprob for t in d.tokens] == pytest.approx([t.logprob for t in expected.tokens])
    assert d.generated_tokens == expected.generated_tokens == len(d.tokens)
    assert d.prompt_tokens == expected.prompt_tokens == len(d.prefill) > 1
    assert d.finish_reason.value in ("length", "eos_token")
    assert d.prefill[0].logprob is None and all(t.logprob < 0 for t in d.prefill[1:])


def test_lorax_client_merged_adapters_and_stream(server, grpc_client):
    client = lorax.Client(server.http_url, timeout=60)
    merged = lorax.types.MergedAdapters(**SPEC)
    reply = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=TOKENS)
    expected = grpc_text(grpc_client, merged_adapters={**SPEC, "merge_strategy": "LINEAR"})
    assert reply.generated_text == expected
    assert expected != grpc_text(grpc_client)  # the merge changes the text
    events = list(client.generate_stream(PROMPT, merged_adapters=merged, max_new_tokens=TOKENS))
    assert "".join(e.token.text for e in events) == events[-1].generated_text == expected
    assert all(e.details is None for e in events[:-1])
    assert events[-1].details.generated_tokens == len(events)


def test_lorax_async_client(server, grpc_client):
    async def run():
        client = lorax.AsyncClient(server.http_url, timeout=60)
        reply = await client.generate(PROMPT, adapter_id="ad-b", max_new_tokens=TOKENS)
        text = "".join(
            [e.token.text async for e in client.generate_stream(PROMPT, adapter_id="ad-b")]
        )
        return reply.generated_text, text

    reply, streamed = asyncio.run(run())
    assert reply == streamed == grpc_text(grpc_client, adapter_id="ad-b")


def test_lorax_routes_and_merge_headers(server, http, grpc_client):
    body = {"inputs": PROMPT, "parameters": {"merged_adapters": SPEC, "max_new_tokens": 4}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200 and r.headers["x-merge-key"].startswith("a-")
    out = r.json()
    assert out["hotmerge"]["merge_key"] == r.headers["x-merge-cache-key"]
    assert out["details"] is None  # details not asked for
    # Strategy names are case-insensitive; hotmerge's extra strategies are accepted.
    cat = {**SPEC, "merge_strategy": "CAT"}
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": cat}})
    assert r.status_code == 200
    assert http.get("/health").status_code == 200
    info = http.get("/info").json()
    assert info["model_id"] == model_name(server) and info["max_input_length"] == 64
    full = http.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"return_full_text": True}}
    ).json()
    assert full["generated_text"] == PROMPT + grpc_text(grpc_client)


# -- OpenAI through the openai package ----------------------------------------------------------


def test_openai_completions_equal_grpc(server, oai, grpc_client):
    base = model_name(server)
    reply = oai.completions.create(model=base, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    expected = grpc_client.generate(PROMPT, max_new_tokens=TOKENS)
    assert reply.choices[0].text == expected.generated_text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generated_tokens
    stream = oai.completions.create(
        model="ad-a", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == grpc_text(grpc_client, adapter_id="ad-a")
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    merged = oai.completions.create(
        model=base, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
        extra_body={"merged_adapters": SPEC},
    )  # fmt: skip
    assert merged.choices[0].text == grpc_text(grpc_client, merged_adapters={**SPEC})


def test_token_ids_in_equal_the_text_they_encode(server, oai, grpc_client):
    ids = server.engine.runner.encode(PROMPT)
    by_ids = oai.completions.create(model="ad-a", prompt=ids, max_tokens=TOKENS, temperature=0)
    by_text = grpc_text(grpc_client, adapter_id="ad-a")
    assert by_ids.choices[0].text == by_text
    assert grpc_client.generate(ids, adapter_id="ad-a", max_new_tokens=TOKENS).generated_text == (
        by_text
    )
    batch = oai.completions.create(model="ad-a", prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text[: len(batch.choices[0].text)]


def test_named_merge_as_model_everywhere(server, oai, http, grpc_client):
    r = http.post("/merges", json={"name": "mix", "merged_adapters": SPEC})
    assert r.status_code == 200, r.text
    assert r.json()["affinity_key"] == r.headers["x-merge-key"]
    inline = grpc_text(grpc_client, merged_adapters=SPEC)
    reply = oai.completions.create(model="mix", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].text == inline
    assert grpc_text(grpc_client, adapter_id="mix") == inline
    assert grpc_text(grpc_client, adapter_id="mix-file") == inline  # from --merges
    lorax_reply = lorax.Client(server.http_url).generate(PROMPT, adapter_id="mix")
    assert lorax_reply.generated_text == grpc_text(
        grpc_client, adapter_id="mix", max_new_tokens=TOKENS
    )
    models = {m.id: m for m in oai.models.list().data}
    assert {model_name(server), "ad-a", "ad-b", "mix", "mix-file"} <= set(models)
    listed = {a.id: a for a in grpc_client.list_adapters()}
    assert listed["mix"].HasField("named_merge") and not listed["ad-a"].HasField("named_merge")
    assert list(listed["mix"].named_merge.ids) == SPEC["ids"]
    # gRPC Merge with a name; a name may not shadow an adapter id.
    assert grpc_client.merge({"ids": ["ad-b"]}, name="just-b").name == "just-b"
    assert grpc_text(grpc_client, adapter_id="just-b") == grpc_text(grpc_client, adapter_id="ad-b")
    r = http.post("/merges", json={"name": "ad-a", "merged_adapters": SPEC})
    assert r.status_code == 422 and "shadow" in r.json()["error"]


def test_chat_needs_a_template_then_equals_grpc(server, oai, grpc_client):
    messages = [{"role": "user", "content": "hello"}]
    tokenizer = server.engine.runner.tokenizer
    assert tokenizer.chat_template is None
    with pytest.raises(openai.BadRequestError, match="chat template"):
        oai.chat.completions.create(model=model_name(server), messages=messages)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        expected = grpc_client.generate(ids, adapter_id="ad-a", max_new_tokens=TOKENS)
        reply = oai.chat.completions.create(
            model="ad-a", messages=messages, max_tokens=TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected.generated_text
        assert reply.usage.prompt_tokens == len(ids)
        chunks = list(
            oai.chat.completions.create(
                model="ad-a", messages=messages, max_tokens=TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected.generated_text
        assert chunks[-1].usage.completion_tokens == expected.generated_tokens
    finally:
        tokenizer.chat_template = None


# -- prompt logprobs -----------------------------------------------------------------------------


@pytest.fixture
def sampled_rows(server, monkeypatch):
    """Every row the engine samples a token for, while the test runs."""
    rows, sample = [], server.engine.runner.sample

    def counting(logits, batch, *previous):
        rows.extend(batch)
        return sample(logits, batch, *previous)

    monkeypatch.setattr(server.engine.runner, "sample", counting)
    return rows


@pytest.mark.parametrize("model", [None, "mix"])
def test_echo_logprobs_equal_the_models_own(setup, server, http, model, sampled_rows):
    """max_tokens 0 + echo scores the prompt without generating a token."""
    if model == "mix":
        http.post("/merges", json={"name": "mix", "merged_adapters": SPEC}).raise_for_status()
    ids = server.engine.runner.encode("The cat sat on the mat")
    body = {"model": model or model_name(server), "prompt": ids, "max_tokens": 0, "echo": True}
    out = http.post("/v1/completions", json={**body, "logprobs": 1, "temperature": 0}).json()
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx(direct_logprobs(setup, ids, model), abs=1e-4)
    assert out["usage"]["completion_tokens"] == 0
    assert out["choices"][0]["text"] == server.engine.runner.tokenizer.decode(ids)
    assert out["choices"][0]["finish_reason"] == "length"
    # echo without logprobs: the prompt back, still nothing generated
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["text"] == server.engine.runner.tokenizer.decode(ids) and plain["logprobs"] is None
    assert not sampled_rows
    http.post("/v1/completions", json={**body, "max_tokens": 1}).raise_for_status()
    assert len(sampled_rows) == 1  # (the spy sees a generated token)


@pytest.mark.parametrize("model", [None, "mix"])
def test_grpc_zero_new_tokens_scores_the_prompt(setup, server, http, grpc_client, model,
                                                sampled_rows):  # fmt: skip
    """gRPC max_new_tokens 0 with prompt_logprobs: transformers' prompt logprobs, no token
    generated, unary and streamed alike; without prompt_logprobs it is refused."""
    if model == "mix":
        http.post("/merges", json={"name": "mix", "merged_adapters": SPEC}).raise_for_status()
    options = dict(adapter_id=model, max_new_tokens=0, prompt_logprobs=True)
    reply = grpc_client.generate(PROMPT, **options)
    assert (reply.generated_tokens, reply.generated_text, list(reply.tokens)) == (0, "", [])
    assert reply.finish_reason == pb.LENGTH and reply.prompt_tokens == len(reply.prompt) > 2
    ids = [t.id for t in reply.prompt]
    assert math.isnan(reply.prompt[0].logprob)
    want = direct_logprobs(setup, ids, model)
    assert [t.logprob for t in reply.prompt[1:]] == pytest.approx(want, abs=1e-4)
    (final,) = grpc_client.generate_stream(PROMPT, **options)  # no token messages
    assert final.done and final.generated_tokens == 0 and len(final.prompt) == len(ids)
    assert [t.logprob for t in final.prompt[1:]] == pytest.approx(want, abs=1e-4)
    assert not sampled_rows
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.generate(PROMPT, adapter_id=model, max_new_tokens=0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "set parameters.prompt_logprobs" in info.value.details()


def test_grpc_prompt_logprobs_and_counts(setup, grpc_client):
    reply = grpc_client.generate(PROMPT, max_new_tokens=2, prompt_logprobs=True)
    assert reply.prompt_tokens == len(reply.prompt) > 2
    ids = [t.id for t in reply.prompt]
    assert math.isnan(reply.prompt[0].logprob)
    expected = direct_logprobs(setup, ids, None)
    assert [t.logprob for t in reply.prompt[1:]] == pytest.approx(expected, abs=1e-4)
    plain = grpc_client.generate(PROMPT, max_new_tokens=2)
    assert plain.prompt_tokens == reply.prompt_tokens and not plain.prompt


# -- errors: status and JSON on every route; the server keeps serving ----------------------------


LORAX_BAD = [
    ("/generate", b"{not json", 400),
    ("/generate", {"parameters": {}}, 422),  # no inputs
    ("/generate", {"inputs": PROMPT, "parameters": {"top_p": 2}}, 422),
    ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}, 404),
    ("/generate", {"inputs": PROMPT, "parameters": {"merged_adapters": {"ids": []}}}, 422),
    (
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {"merged_adapters": {"ids": ["ad-a"], "merge_strategy": "best"}},
        },
        422,
    ),  # noqa: E501
    ("/generate", {"inputs": PROMPT, "parameters": {"watermark": True}}, 422),
    ("/generate_stream", {"inputs": ""}, 422),
    ("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, 422),
    (  # LoRAX always generates: no prompt scoring there
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 0, "decoder_input_details": True}},
        422,
    ),
    ("/merges", {"name": "bad name!", "merged_adapters": SPEC}, 422),
]
OPENAI_BAD = [
    ("/v1/completions", b"[", 400),
    ("/v1/completions", {"model": "x"}, 400),  # no prompt
    ("/v1/completions", {"model": "nope", "prompt": PROMPT}, 404),
    ("/v1/completions", {"model": "ad-a", "prompt": PROMPT, "n": 2}, 400),
    ("/v1/completions", {"model": "ad-a", "prompt": PROMPT, "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "ad-a", "prompt": PROMPT, "max_tokens": -1}, 400),
    (
        "/v1/chat/completions",
        {"model": "ad-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
    ),
    ("/v1/completions", {"model": "ad-a", "prompt": [10**9], "max_tokens": 1}, 400),
    ("/v1/completions", {"model": "ad-a", "prompt": PROMPT, "merged_adapters": SPEC}, 400),
    ("/v1/chat/completions", {"model": "ad-a", "messages": "hi"}, 400),
    (
        "/v1/chat/completions",
        {"model": "ad-a", "messages": [{"role": "user", "content": "x"}]},
        400,
    ),  # noqa: E501
]


@pytest.mark.parametrize(("route", "body", "status"), LORAX_BAD + OPENAI_BAD)
def test_bad_input_gets_its_status_and_error_json(http, route, body, status):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if route.startswith("/v1/"):
        assert err["message"] and err["type"] and err["code"] == status
    else:
        assert isinstance(err, str) and err and r.json()["error_type"]
    ok = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200  # still serving


def test_health_readiness_and_balancer_metrics(server, http):
    assert http.get("/healthz").text == "ok\n"
    assert http.get("/readyz").status_code == 200
    text = http.get("/metrics").text
    for name in (
        "hotmerge_queue_depth",
        "hotmerge_num_requests_running",
        "hotmerge_kv_cache_usage_perc",
        'hotmerge_lora_requests_info{max_lora="4"',
        'hotmerge_requests_total{code="OK",method="POST /generate"}',
    ):
        assert name in text, name


def test_running_and_waiting_adapter_names(server):
    engine = server.engine
    assert engine.running_requests == 0 and engine.kv_cache_usage == 0.0
    params = server.path.params(max_new_tokens=40)
    handles = [
        server.path.submit(generation_request(params, inputs=PROMPT, adapter_id=a)).handle
        for a in ("ad-a", "mix-file", None, "ad-b", "ad-a")  # 5 rows, batches of 4: one waits
    ]
    seen_running, seen_waiting = set(), set()
    for _ in range(200):
        running, waiting = engine.adapter_names()
        seen_running |= set(running)
        seen_waiting |= set(waiting)
        if all(h.result for h in handles):
            break
        time.sleep(0.01)
    for h in handles:
        h.wait()
    assert {"ad-a", "mix-file"} <= seen_running
    assert seen_running <= {"ad-a", "ad-b", "mix-file"}  # named: by its name; no base model
    assert seen_waiting <= {"ad-a", "ad-b", "mix-file"}
    assert engine.adapter_names() == ([], [])


# -- lm-eval-harness ----------------------------------------------------------------------------

ITEMS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "answer": 1},
]


@pytest.mark.parametrize("model", [None, "mix-file"])
def test_lm_eval_local_completions_loglikelihoods(setup, server, tmp_path, monkeypatch, model):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in ITEMS))
    (tmp_path / "tiny.yaml").write_text(
        "task: hotmerge_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    _, model_dir, _ = setup
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": model or model_name(server),
            "base_url": f"{server.http_url}/v1/completions",
            "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["hotmerge_tiny"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    tokenizer = server.engine.runner.tokenizer
    samples = out["samples"]["hotmerge_tiny"]
    assert len(samples) == len(ITEMS)
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            direct = sum(direct_logprobs(setup, whole, "mix" if model else None)[len(ctx) - 1 :])
            assert float(resp[0][0]) == pytest.approx(direct, abs=1e-3)


# -- gRPC additions ------------------------------------------------------------------------------


def test_grpc_inputs_and_input_ids_together_are_refused(server, grpc_client):
    import grpc

    request = pb.GenerateRequest(inputs=PROMPT, input_ids=[1, 2, 3])
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.HotmergeStub(channel).Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in err.value.details()


def test_grpc_reflection_v1_beside_v1alpha(server):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.target) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(call(iter([request]), timeout=10))
            names = {s.name for s in reply.list_services_response.service}
            assert {"hotmerge.v1.Hotmerge", "grpc.reflection.v1.ServerReflection"} <= names


def test_merges_file_errors_name_the_entry(tmp_path):
    from hotmerge.errors import InvalidArgument
    from hotmerge.merging.named import NamedMerges

    named = NamedMerges(lambda name: name == "ad-a")
    bad = tmp_path / "merges.json"
    broken = {"ids": ["ad-a"], "merge_strategy": "ties", "density": 2}
    bad.write_text(json.dumps({"ok": {"ids": ["ad-a"]}, "broken": broken}))
    with pytest.raises(InvalidArgument, match="broken"):
        named.load_file(bad)
    assert named.list() == []  # all or none
    bad.write_text('{"ad-a": {"ids": ["ad-b"]}}')
    with pytest.raises(InvalidArgument, match="shadow"):
        named.load_file(bad)
