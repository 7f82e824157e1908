"""ΔW-space merges (*_svd) on the device at Llama / Mistral shapes (run with ``pytest -m gpu``);
the same checks at small shapes on the CPU (Triton interpreter) in the default suite.

Per module, the merged adapter's ΔW' = B'·A' (bf16 factors, product in float64) against the
exact rank-r truncation of the merged ΔW: ‖ΔW − ΔW'‖_F <= 1.001·‖ΔW − ΔW_r‖_F (merge.py's
contract), ‖ΔW − ΔW_r‖_F = sqrt(Σ_{i>r} σᵢ²) (Eckart–Young) from the exact singular values of
ΔW in float64 (the eigenvalues of its Gram matrix; ``test_exact_tail_is_svdvals_tail``). The
merged ΔW is
- ``svd``, ``ties_svd``, ``magnitude_prune_svd``: recomputed here in float64 from the adapters'
  factors (ΔWᵢ = sᵢ·Bᵢ·Aᵢ, trim, sign election, weighted sum), independently of the engines;
- ``dare_linear_svd``, ``dare_ties_svd``: the Triton engine's own merged ΔW, read where
  ``delta_merge`` hands it to ``factors`` (the DARE mask is the engine's Philox stream, not
  recomputed here); checked equal to the torch engine's, its share of zeros against the density.
For every strategy both backends' merged ΔW (as handed to ``factors``) agree, both merged
adapters meet the contract, and their ΔW' agree. ``GROUP_BYTES`` is set to two square modules,
so that modules of one shape are factorised in several groups of several modules.
"""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.merge import delta, merge_adapters
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy

from tests.kernels.random_adapters import make_adapter, needs_triton

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# {projection: (in_features, out_features)}: Llama / Mistral-7B's on the device (k and v as in
# GQA, up_proj 14336 x 4096); on the CPU (the Triton interpreter, in the default suite) scaled
# down, with EXACT_FACTOR 1 so that q, o and up still take the randomized path (48 > rank +
# OVERSAMPLE) and k, v (24 wide) the exact SVD, as k and v do at 1024 on the device.
PROJ = {
    "cuda": {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
             "o_proj": (4096, 4096), "up_proj": (4096, 14336)},
    "cpu": {"q_proj": (48, 48), "k_proj": (48, 24), "v_proj": (48, 24),
            "o_proj": (48, 48), "up_proj": (48, 168)},
}  # fmt: skip
CASES = {  # name: (ranks, scalings, weights, svd_rank, sign method, a module adapter 2 lacks)
    "rank16": ((16, 16, 16), (2.0, 1.0, 0.5), (0.7, -0.5, 1.2), None, "total", None),
    "mixed": ((8, 16, 8), (2.0, 0.5, 1.25), (1.0, 0.6, -0.8), 12, "frequency",
              "model.layers.1.self_attn.q_proj"),
}  # fmt: skip
STRATEGIES = ["svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"]


def _modules(device: str) -> dict[str, tuple[int, int]]:
    """{path: (in_features, out_features)}: layer 0's q, k, v, o and up_proj, layer 1's q_proj
    (three square ΔWs: a group of two and one alone; k and v: a group of two)."""
    proj = PROJ[device]
    modules = {f"model.layers.0.{'mlp' if p == 'up_proj' else 'self_attn'}.{p}": s
               for p, s in proj.items()}  # fmt: skip
    modules["model.layers.1.self_attn.q_proj"] = proj["q_proj"]
    return modules


def _adapters(device: str, case: str):
    ranks, scalings, _, _, _, lacks = CASES[case]
    modules = _modules(device)
    ads = []
    for i, (rank, scaling) in enumerate(zip(ranks, scalings, strict=True)):
        own = {m: s for m, s in modules.items() if not (i == 2 and m == lacks)}
        ads.append(
            make_adapter(
                own, rank, seed=100 + i, scaling=scaling, dtype=torch.bfloat16, device=device
            )
        )
    return ads


def _run(ads, params, backend, monkeypatch):
    """(merged adapter, {module: its merged float32 ΔW as handed to ``factors``}, group sizes)."""
    batches, names = [], []

    def spy(deltas, rank, clamp=None):
        batches.append(deltas.clone())
        return real(deltas, rank, clamp)

    real = delta.factors
    for a in ads:
        a.cache.clear()  # trim thresholds: each backend computes its own
    with monkeypatch.context() as patch:
        patch.setattr(delta, "factors", spy)
        merged = merge_adapters(
            ads, params, backend=backend, progress=lambda d, t, m: names.append(m)
        ).adapter
    deltas = dict(zip(names, [d for batch in batches for d in batch], strict=True))
    return merged, deltas, [len(b) for b in batches]


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep |x| >= the k-th largest |x|, k = int(density·numel) (k = 0: nothing)."""
    k = int(density * x.numel())
    if density >= 1:
        return x
    if k == 0:
        return torch.zeros_like(x)
    threshold = x.abs().flatten().sort().values[x.numel() - k]
    return torch.where(x.abs() >= threshold, x, 0.0)


def _combined(ads, module: str, params: MergeParams) -> torch.Tensor:
    """The merged ΔW of linear / magnitude_prune / ties in ΔW space, float64, from merge.py's
    contract alone (over the adapters that have ``module``)."""
    present = [(a, w) for a, w in zip(ads, params.weights, strict=True) if module in a.modules]
    xs = torch.stack(
        [a.scaling * (a.tensor(module, "B").double() @ a.tensor(module, "A").double())
         for a, _ in present]
    )  # fmt: skip
    w = torch.tensor([w for _, w in present], dtype=torch.float64, device=xs.device)
    w = w.view(-1, 1, 1)
    base = params.strategy.elementwise
    if base in (Strategy.MAGNITUDE_PRUNE, Strategy.TIES):
        xs = torch.stack([_trim(x, params.density) for x in xs])
    if base is Strategy.TIES:
        total = xs.sum(0) if params.sign_method is SignMethod.TOTAL else xs.sign().sum(0)
        keep = xs.sign() == torch.where(total >= 0, 1.0, -1.0)
        return (w * xs * keep).sum(0) / keep.sum(0).clamp_min(1)
    assert base in (Strategy.LINEAR, Strategy.MAGNITUDE_PRUNE)
    return (w * xs).sum(0)


def _exact_tail(m: torch.Tensor, rank: int) -> torch.Tensor:
    """‖m − m_r‖_F of the exact rank-``rank`` truncation: sqrt(Σ_{i>r} σᵢ²), the σᵢ² being the
    eigenvalues of m's smaller float64 Gram matrix (one eigvalsh, not a full SVD)."""
    m = m.double()
    gram = m.mT @ m if m.shape[-1] <= m.shape[-2] else m @ m.mT
    evals = torch.linalg.eigvalsh(gram)  # ascending
    return evals[: max(0, len(evals) - rank)].clamp_min(0).sum().sqrt()


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """Share of elements that differ beyond float32 rounding (a trim or sign decision can flip
    where the inputs tie to rounding: rare, and harmless to the contract)."""
    got, want = got.double(), want.double()
    bad = (got - want).abs() > 1e-5 * want.abs().max() + 1e-4 * want.abs()
    return bad.double().mean().item()


def _product(merged, module: str) -> torch.Tensor:
    return merged.tensor(module, "B").double() @ merged.tensor(module, "A").double()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "device,case",
    [
        pytest.param("cuda", "rank16", marks=[pytest.mark.gpu, cuda]),
        pytest.param("cuda", "mixed", marks=[pytest.mark.gpu, cuda]),
        pytest.param("cpu", "mixed", marks=needs_triton),  # the interpreter: one case, < 10 s
    ],
)
def test_delta_merge_meets_the_contract(monkeypatch, device, case, strategy):
    ranks, _, weights, svd_rank, sign, lacks = CASES[case]
    params = MergeParams(
        Strategy(strategy), weights, 0.5 if "dare" in strategy else 0.4, SignMethod(sign),
        seed=2**33 + 7, svd_rank=svd_rank,
    )  # fmt: skip
    rank = svd_rank or max(ranks)
    ads = _adapters(device, case)
    n = PROJ[device]["q_proj"][0]
    monkeypatch.setattr(delta, "GROUP_BYTES", 2 * 4 * n * n)  # two square ΔWs a group
    if device == "cpu":
        monkeypatch.setattr(delta, "EXACT_FACTOR", 1)

    tri, tri_deltas, groups = _run(ads, params, "triton", monkeypatch)
    twin, twin_deltas, twin_groups = _run(ads, params, "torch", monkeypatch)
    assert groups == twin_groups
    assert max(groups) > 1 and len(groups) > 3, groups  # 3 shapes, one in two groups
    assert set(tri_deltas) == set(tri.modules) == set(_modules(device))
    for merged in (tri, twin):
        assert merged.rank == rank and merged.scaling == 1.0
        assert merged.dtype == torch.bfloat16 and merged.device.type == device

    dare = params.strategy.elementwise in (Strategy.DARE_LINEAR, Strategy.DARE_TIES)
    for module in tri.modules:
        engine = tri_deltas[module]
        assert _mismatch(engine, twin_deltas[module]) <= 1e-5, module  # Triton == torch engine
        present = sum(module in a.modules for a in ads)
        assert present == (2 if module == lacks else 3)
        if dare:  # an element is zero where every adapter's was dropped
            zeros = (engine == 0).double().mean().item()
            expect = (1 - params.density) ** present
            assert abs(zeros - expect) < 5 * (expect * (1 - expect) / engine.numel()) ** 0.5
            m = engine.double()
        else:
            m = _combined(ads, module, params)
            assert _mismatch(engine, m) <= 1e-5, module
        tail = _exact_tail(m, rank)
        assert tail > 1e-2 * torch.linalg.matrix_norm(m), module  # a real truncation
        got, want = _product(tri, module), _product(twin, module)
        for name, product in (("triton", got), ("torch", want)):
            ratio = (torch.linalg.matrix_norm(m - product) / tail).item()
            assert ratio <= 1.001, (module, name, ratio)
        agree = (torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)).item()
        assert agree <= 1e-3, (module, agree)
        del m, got, want


def test_exact_tail_is_svdvals_tail():
    gen = torch.Generator().manual_seed(5)
    for rows, cols in ((90, 40), (40, 90)):
        m = torch.randn(rows, 12, generator=gen) @ torch.randn(12, cols, generator=gen)
        m = m + 0.1 * torch.randn(rows, cols, generator=gen)
        want = torch.linalg.svdvals(m.double())[6:].square().sum().sqrt()
        torch.testing.assert_close(_exact_tail(m, 6), want, rtol=1e-10, atol=0)
