"""A merged adapter on a tiny Llama gives PEFT's add_weighted_adapter weights and logits."""

from __future__ import annotations

import copy

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (target modules, r, alpha, rslora)
    "a": (ALL, 4, 8, False),
    "b": (["q_proj", "v_proj", "down_proj"], 4, 6, True),
    "c": (["q_proj", "k_proj", "up_proj"], 4, 3, False),
}
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    model = None
    for name, (targets, r, alpha, rslora) in ADAPTERS.items():
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
            init_lora_weights=False,
        )  # fmt: skip
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def flat_adapter(model, name: str) -> FlatAdapter:
    tensors, scaling = {}, None
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            key = path.removeprefix(PREFIX)
            tensors[(key, "A")] = module.lora_A[name].weight.detach().clone()
            tensors[(key, "B")] = module.lora_B[name].weight.detach().clone()
            scaling = module.scaling[name]
    return FlatAdapter.from_tensors(tensors, rank=ADAPTERS[name][1], scaling=scaling)


@pytest.mark.parametrize(
    "strategy,density,sign",
    [
        ("linear", 1.0, "total"),
        ("ties", 0.4, "total"),
        ("ties", 0.6, "frequency"),
        ("magnitude_prune", 0.3, "total"),
        ("cat", 1.0, "total"),
    ],
)
def test_merged_adapter_matches_peft_add_weighted_adapter(peft_model, strategy, density, sign):
    names = list(ADAPTERS)
    weights = (0.7, -0.5, 1.2)
    merged_name = f"merged_{strategy}_{sign}"
    peft_model.add_weighted_adapter(
        names, list(weights), merged_name, combination_type=strategy, density=density,
        majority_sign_method=sign,
    )  # fmt: skip
    params = MergeParams(Strategy(strategy), weights, density, SignMethod(sign))
    ours = merge_adapters([flat_adapter(peft_model, n) for n in names], params).adapter

    # Weights: bit for bit, module by module.
    theirs = {}
    for path, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and merged_name in module.lora_A:
            key = path.removeprefix(PREFIX)
            assert module.scaling[merged_name] == 1.0
            theirs[key] = (module.lora_A[merged_name].weight, module.lora_B[merged_name].weight)
    assert set(theirs) == set(ours.modules)
    for key, (lora_a, lora_b) in theirs.items():
        assert torch.equal(ours.tensor(key, "A"), lora_a), key
        assert torch.equal(ours.tensor(key, "B"), lora_b), key

    # Logits: base weights plus our ΔW = B·A·scaling against PEFT's merged adapter, active.
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    peft_model.set_adapter(merged_name)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        plain = copy.deepcopy(peft_model.base_model.model)
    plain = _strip_lora(plain)
    with torch.no_grad():
        for module in ours.modules:
            linear = plain.get_submodule(module)
            delta = ours.tensor(module, "B") @ ours.tensor(module, "A") * ours.scaling
            linear.weight += delta
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _strip_lora(model):
    """Replace each LoRA wrapper by its base Linear (in a copy of the model)."""
    for path, module in list(model.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)
    return model
