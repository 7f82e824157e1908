"""The adapter store: PEFT parsing, validation, path safety, LRU by bytes, pins, one load."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time

import pytest
import torch
from hotmerge.adapters.store import AdapterStore
from hotmerge.embedded import linear_shapes
from hotmerge.errors import InvalidArgument, NotFound, ResourceExhausted
from safetensors.torch import load_file

from tests.helpers import ALL_PROJ, make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model_dir = tiny_llama(tmp)
    other_dir = tiny_llama(tmp, name="other", hidden_size=32, num_attention_heads=2)
    pristine = tmp / "pristine"
    make_peft_adapter(model_dir, pristine / "a", r=4, alpha=8, seed=1)
    make_peft_adapter(model_dir, pristine / "b", r=4, alpha=8, seed=2)
    make_peft_adapter(model_dir, pristine / "c", r=4, alpha=8, seed=3)
    make_peft_adapter(
        model_dir,
        pristine / "org" / "rs",
        r=8,
        alpha=16,
        target_modules=ALL_PROJ,
        seed=4,
        use_rslora=True,
    )
    make_peft_adapter(other_dir, pristine / "wrong-model", r=4, alpha=8, seed=5)
    return model_dir, pristine


@pytest.fixture
def root(built, tmp_path):
    """A fresh copy of the adapter tree for each test (tests edit files)."""
    _, pristine = built
    shutil.copytree(pristine, tmp_path / "root")
    return tmp_path / "root"


def store_for(built, root, budget=1 << 30, **kw) -> AdapterStore:
    model_dir, _ = built
    return AdapterStore(
        root,
        device="cpu",
        dtype=torch.float32,
        budget_bytes=budget,
        module_shapes=linear_shapes(model_dir),
        **kw,
    )


def test_loads_peft_tensors_with_scaling(built, root):
    store = store_for(built, root)
    adapter, load_ms = store.get("a")
    assert load_ms > 0
    info = adapter.info
    assert (info.id, info.rank, info.alpha, info.use_rslora) == ("a", 4, 8.0, False)
    assert info.target_modules == ("q_proj", "v_proj") and info.loaded
    assert adapter.weights.scaling == 2.0 and adapter.weights.rank == 4
    raw = load_file(str(root / "a" / "adapter_model.safetensors"))
    assert len(adapter.weights.modules) == 4  # q, v in two layers
    for module in adapter.weights.modules:
        for part in "AB":
            want = raw[f"base_model.model.{module}.lora_{part}.weight"]
            assert torch.equal(adapter.weights.tensor(module, part), want)
    assert info.nbytes == adapter.weights.nbytes == store.used_bytes
    again, load_ms = store.get("a")
    assert again is adapter and load_ms == 0.0

    rs, _ = store.get("org/rs")
    assert rs.weights.scaling == pytest.approx(16 / math.sqrt(8))
    assert len(rs.weights.modules) == 14


def test_revision_is_a_content_hash_computed_on_load(built, root):
    store = store_for(built, root)
    h = hashlib.sha256()
    h.update((root / "a" / "adapter_model.safetensors").read_bytes())
    h.update((root / "a" / "adapter_config.json").read_bytes())
    listed = {i.id: i for i in store.list()}
    # Listing reads headers only: no revision before the first load.
    assert listed["a"].revision == "" and not listed["a"].loaded
    info, _ = store.load("a")
    assert info.revision == h.hexdigest()[:16] and info.nbytes == listed["a"].nbytes
    store.load("b")
    assert store.unload("a")
    listed = {i.id: i for i in store.list()}
    assert listed["a"].revision == info.revision and not listed["a"].loaded  # remembered
    assert listed["a"].revision != listed["b"].revision
    (root / "a" / "adapter_config.json").write_text(
        (root / "a" / "adapter_config.json").read_text() + " "
    )
    assert {i.id: i for i in store.list()}["a"].revision == ""  # changed since: unknown


def test_list_shows_loaded_and_found(built, root):
    store = store_for(built, root)
    store.load("b")
    infos = store.list()
    assert [i.id for i in infos] == ["b", "a", "c", "org/rs", "wrong-model"]
    assert [i.loaded for i in infos] == [True, False, False, False, False]


def test_unknown_adapter_is_not_found(built, root):
    store = store_for(built, root)
    with pytest.raises(NotFound, match="nope"):
        store.get("nope")
    with pytest.raises(NotFound):
        store.get("org/nope")


@pytest.mark.parametrize(
    "bad_id", ["../a", "/etc", "a/../../x", "org/rs/extra", "", ".hidden", "a//b", "a\\b"]
)
def test_ids_that_could_escape_the_root_are_rejected(built, root, bad_id):
    with pytest.raises(InvalidArgument, match="not valid"):
        store_for(built, root).get(bad_id)


def test_symlink_escaping_the_root_is_rejected(built, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "a", outside)
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="outside the adapter root"):
        store_for(built, root).get("sneaky")
    (root / "c" / "adapter_model.safetensors").unlink()
    (root / "c" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(InvalidArgument, match="outside the adapter root"):
        store_for(built, root).get("c")


def test_pickle_only_adapter_is_rejected(built, root):
    weights = root / "a" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), root / "a" / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(InvalidArgument, match="convert it to safetensors"):
        store_for(built, root).get("a")


def test_adapter_for_another_model_is_rejected_naming_module_and_shapes(built, root):
    with pytest.raises(InvalidArgument) as err:
        store_for(built, root).get("wrong-model")
    msg = str(err.value)
    assert "'wrong-model'" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "(4, 32)" in msg and "expected (4, 64)" in msg


def test_module_missing_from_the_model_is_rejected(built, root):
    model_dir, _ = built
    shapes = linear_shapes(model_dir)
    del shapes["model.layers.1.self_attn.v_proj"]
    store = AdapterStore(
        root, device="cpu", dtype=torch.float32, budget_bytes=1 << 30, module_shapes=shapes
    )
    with pytest.raises(InvalidArgument, match="model.layers.1.self_attn.v_proj"):
        store.get("a")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": 0}, "r must be an integer in"),
    ],
)
def test_unsupported_configs_are_rejected(built, root, change, match):
    path = root / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(InvalidArgument, match=match):
        store_for(built, root).get("a")


def test_lru_eviction_by_bytes(built, root):
    probe = store_for(built, root)
    size = probe.get("a")[0].info.nbytes
    store = store_for(built, root, budget=2 * size + size // 2)  # room for two
    store.get("a")
    store.get("b")
    store.get("a")  # b is now the least recently used
    store.get("c")
    assert store.is_loaded("a") and store.is_loaded("c") and not store.is_loaded("b")
    assert store.used_bytes == 2 * size <= store.budget_bytes
    with pytest.raises(ResourceExhausted, match="budget"):
        store_for(built, root, budget=size - 1).get("a")


def test_adapter_in_use_is_not_evicted(built, root):
    probe = store_for(built, root)
    size = probe.get("a")[0].info.nbytes
    store = store_for(built, root, budget=size + size // 2, max_wait_s=0.2)  # room for one
    with store.use("a"):
        with pytest.raises(ResourceExhausted, match="in use"):
            store.get("b")
        assert store.is_loaded("a")
        with pytest.raises(ResourceExhausted):
            store.unload("a")
    store.get("b")  # a was released: now it can go
    assert not store.is_loaded("a") and store.is_loaded("b")
    assert store.unload("b") and not store.unload("b")
    assert store.used_bytes == 0


def test_concurrent_gets_load_once(built, root):
    store = store_for(built, root)
    real_read = store._read

    def slow_read(*args):
        time.sleep(0.2)  # keep the load in flight while the others ask
        return real_read(*args)

    store._read = slow_read
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.get("org/rs"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.loads == 1
    assert len(got) == 8 and len({id(adapter) for adapter, _ in got}) == 1


def test_failed_load_can_be_retried(built, root):
    store = store_for(built, root)
    weights = root / "a" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    with pytest.raises(NotFound):
        store.get("a")
    weights.write_bytes(saved)
    assert store.get("a")[0].info.id == "a"
