"""ΔW-space merges (*_svd): PEFT's add_weighted_adapter on a tiny Llama with mixed ranks, the
randomized factorisation against an exact SVD (alone and batched), DARE in ΔW space across runs
and engines, groups of modules factorised together against one by one."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.merge import delta, merge_adapters
from hotmerge_kernels.merge.delta import low_rank
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import philox_pruning
from tests.kernels.random_adapters import make_adapter, needs_triton
from tests.kernels.test_merge_peft_model import PREFIX, flat_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (target modules, r, alpha, rslora); the first sets the merged config
    "a": (ALL, 8, 16, False),
    "b": (["q_proj", "v_proj", "down_proj"], 4, 6, True),
    "c": (["q_proj", "k_proj", "up_proj"], 4, 3, False),
}
WEIGHTS = (0.7, -0.5, 1.2)


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = None
    for name, (targets, r, alpha, rslora) in ADAPTERS.items():
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
            init_lora_weights=False,
        )  # fmt: skip
        if model is None:
            model = get_peft_model(LlamaForCausalLM(config).eval(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def _ours(model, params, backend="torch"):
    adapters = []
    for name in ADAPTERS:
        flat = flat_adapter(model, name)
        flat.rank = ADAPTERS[name][1]
        adapters.append(flat)
    return merge_adapters(adapters, params, backend=backend).adapter


CASES = [
    ("svd", 1.0, "total", None, None),
    ("svd", 1.0, "total", 6, 0.9),
    ("ties_svd", 0.4, "total", None, None),
    ("ties_svd", 0.6, "frequency", 5, None),
    ("magnitude_prune_svd", 0.3, "total", None, None),
    ("dare_linear_svd", 0.5, "total", None, None),
    ("dare_ties_svd", 0.6, "frequency", None, 0.95),
]


@pytest.mark.parametrize("strategy,density,sign,svd_rank,svd_clamp", CASES)
def test_delta_merge_matches_peft_add_weighted_adapter(
    peft_model, monkeypatch, strategy, density, sign, svd_rank, svd_clamp
):
    params = MergeParams(
        Strategy(strategy), WEIGHTS, density, SignMethod(sign), seed=5, svd_rank=svd_rank,
        svd_clamp=svd_clamp,
    )  # fmt: skip
    merged_name = f"m_{strategy}_{sign}_{svd_rank}_{svd_clamp}".replace(".", "p")
    monkeypatch.setattr(
        merge_utils, "random_pruning", philox_pruning(peft_model, list(ADAPTERS), params.seed)
    )
    peft_model.add_weighted_adapter(
        list(ADAPTERS), list(WEIGHTS), merged_name, combination_type=strategy, density=density,
        majority_sign_method=sign, svd_rank=svd_rank, svd_clamp=svd_clamp,
    )  # fmt: skip
    ours = _ours(peft_model, params)
    assert ours.rank == (svd_rank or 8) and ours.scaling == 1.0

    theirs = {}
    for path, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and merged_name in module.lora_A:
            assert module.scaling[merged_name] == 1.0
            a, b = module.lora_A[merged_name].weight, module.lora_B[merged_name].weight
            theirs[path.removeprefix(PREFIX)] = (b @ a).detach()
    assert set(theirs) == set(ours.modules)
    for module, expected in theirs.items():
        got = ours.tensor(module, "B") @ ours.tensor(module, "A")
        assert got.abs().max() > 0, module
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def _merged_delta(rows: int, cols: int, seed: int, ties: bool) -> torch.Tensor:
    """A merged ΔW as serving makes them: a sum of rank-16 products, TIES-trimmed or not."""
    gen = torch.Generator().manual_seed(seed)
    deltas = [
        torch.randn(rows, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
        for _ in range(3)
    ]
    if not ties:
        return sum(deltas)
    trimmed = []
    for d in deltas:
        thr = d.abs().flatten().kthvalue(d.numel() // 2).values
        trimmed.append(torch.where(d.abs() >= thr, d, 0.0))
    stack = torch.stack(trimmed)
    sign = stack.sum(0) >= 0
    keep = torch.where(sign, stack > 0, stack < 0)
    return (stack * keep).sum(0) / keep.sum(0).clamp_min(1)


@pytest.mark.parametrize(
    "rows,cols,rank,ties",
    [(640, 512, 16, True), (512, 900, 16, True), (700, 400, 8, False), (600, 600, 32, True)],
)
def test_randomized_factorisation_is_within_the_contract(rows, cols, rank, ties):
    m = _merged_delta(rows, cols, seed=rows + cols, ties=ties)
    u, s, vh = low_rank(m, rank, method="randomized")
    eu, es, evh = low_rank(m, rank, method="exact")
    approx = torch.linalg.matrix_norm(m - (u * s) @ vh)
    exact = torch.linalg.matrix_norm(m - (eu * es) @ evh)
    assert exact > 0
    assert approx <= exact * 1.001, (approx / exact).item()
    assert torch.equal(u, low_rank(m, rank, method="randomized")[0])  # seeded: same every run


def test_spectrum_of_a_generic_matrix_too():
    gen = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(800, 300, generator=gen)).Q
    q2 = torch.linalg.qr(torch.randn(500, 300, generator=gen)).Q
    spectrum = 0.9 ** torch.arange(300.0)  # slow decay, no gap at the rank
    m = (q1 * spectrum) @ q2.T
    u, s, vh = low_rank(m, 16, method="randomized")
    tail = torch.sqrt((spectrum[16:] ** 2).sum())
    assert torch.linalg.matrix_norm(m - (u * s) @ vh) <= tail * 1.001


MODULES = {
    "model.layers.0.self_attn.q_proj": (37, 37),
    "model.layers.0.self_attn.v_proj": (37, 11),
    "model.layers.0.mlp.down_proj": (53, 37),
}


def _mixed_adapters():
    ads = [make_adapter(MODULES, 8, seed=1), make_adapter(MODULES, 4, seed=2, scaling=0.5)]
    ads.append(make_adapter(dict(list(MODULES.items())[:2]), 6, seed=3, scaling=1.5))
    return ads


@needs_triton
@pytest.mark.parametrize("strategy", ["dare_ties_svd", "dare_linear_svd", "ties_svd"])
def test_delta_merge_kernels_equal_torch_twin_and_runs(strategy):
    params = MergeParams(Strategy(strategy), (1.0, 0.6, -0.8), 0.5, seed=9)
    torch_out = merge_adapters(_mixed_adapters(), params, backend="torch").adapter
    kernel_out = merge_adapters(_mixed_adapters(), params, backend="triton").adapter
    again = merge_adapters(_mixed_adapters(), params, backend="triton").adapter
    assert torch.equal(kernel_out.buffer, again.buffer)
    for module in torch_out.modules:
        want = torch_out.tensor(module, "B") @ torch_out.tensor(module, "A")
        got = kernel_out.tensor(module, "B") @ kernel_out.tensor(module, "A")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    if strategy.startswith("dare"):
        other = merge_adapters(
            _mixed_adapters(), MergeParams(Strategy(strategy), (1.0, 0.6, -0.8), 0.5, seed=10)
        ).adapter
        assert not torch.allclose(other.buffer, torch_out.buffer)


def test_one_adapter_merges_as_linear_as_peft_does():
    ad = make_adapter(MODULES, 8, seed=1)
    params = MergeParams(Strategy.TIES_SVD, (0.5,), 0.5, svd_rank=3)
    out = merge_adapters([ad], params).adapter
    assert out.rank == 8
    module = "model.layers.0.mlp.down_proj"
    # linear folds sqrt(w·s) into B: B'² = B²·w·s
    torch.testing.assert_close(
        out.tensor(module, "B") ** 2, ad.tensor(module, "B") ** 2 * 0.5 * 2.0
    )


def test_batched_factorisation_equals_one_by_one_within_the_contract():
    ms = torch.stack([_merged_delta(520, 610, seed=s, ties=s != 1) for s in range(3)])
    u, s, vh = low_rank(ms, 16, method="randomized")
    for k, m in enumerate(ms):
        alone = low_rank(m, 16, method="randomized")
        torch.testing.assert_close((u[k] * s[k]) @ vh[k], (alone[0] * alone[1]) @ alone[2])
        exact = torch.linalg.svdvals(m)[16:].square().sum().sqrt()
        assert torch.linalg.matrix_norm(m - (u[k] * s[k]) @ vh[k]) <= exact * 1.001
        assert torch.allclose(u[k].T @ u[k], torch.eye(16), atol=1e-5)


def test_rank_deficient_matrix_is_reconstructed():
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(300, 4, generator=gen) @ torch.randn(4, 260, generator=gen)  # rank 4 < 16
    u, s, vh = low_rank(m, 16, method="randomized")
    assert s.shape == (16,) and torch.all(s[4:] < 1e-4 * s[0])
    torch.testing.assert_close((u * s) @ vh, m, rtol=0, atol=1e-4 * m.abs().max().item())


BIG = {  # randomized-path shapes: three modules of one ΔW shape, one of another
    "model.layers.0.mlp.up_proj": (150, 170),
    "model.layers.1.mlp.up_proj": (150, 170),
    "model.layers.2.mlp.up_proj": (150, 170),
    "model.layers.0.self_attn.q_proj": (140, 140),
}


@pytest.mark.parametrize("strategy", ["ties_svd", "svd"])
def test_groups_of_modules_equal_one_by_one(monkeypatch, strategy):
    """Mixed ranks and shapes, a module one adapter lacks: merged with every shape in one group
    (the default), in groups of two of the shared shape, or one module at a time."""
    ads = [make_adapter(BIG, 8, seed=1), make_adapter(BIG, 4, seed=2, scaling=0.5)]
    ads.append(make_adapter(dict(list(BIG.items())[1:]), 6, seed=3, scaling=1.5))
    params = MergeParams(Strategy(strategy), (1.0, 0.6, -0.8), 0.5, svd_rank=8, seed=9)
    together = merge_adapters(ads, params, backend="torch").adapter
    monkeypatch.setattr(delta, "GROUP_BYTES", 2 * 4 * 150 * 170)
    pairs = merge_adapters(ads, params, backend="torch").adapter
    monkeypatch.setattr(delta, "GROUP_BYTES", 1)
    alone = merge_adapters(ads, params, backend="torch").adapter
    for module in together.modules:
        want = alone.tensor(module, "B") @ alone.tensor(module, "A")
        for got in (together, pairs):
            torch.testing.assert_close(
                got.tensor(module, "B") @ got.tensor(module, "A"), want, rtol=1e-4,
                atol=1e-5 * want.abs().max().item(),
            )  # fmt: skip
