"""Test builders: a tiny Llama with the byte-level tokenizer, and real PEFT adapters for it.

Nothing is downloaded: the model comes from a config with a fixed seed, the adapters from
peft itself with ``init_lora_weights=False`` (so lora_B is random and non-zero).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from hotmerge.api.core import stored_adapter_lease
from hotmerge.config import ServerConfig
from hotmerge.embedded import ALL_PROJ, save_tiny_llama
from hotmerge.engine import Engine, EngineConfig

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
__all__ = ["ALL_PROJ"]  # re-exported for the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_server_config(tmp: Path, model_dir: Path, adapter_root: Path, **overrides) -> ServerConfig:
    """A server on free loopback ports (gRPC and HTTP), on the CPU in float32, for a model
    built by the test; ``overrides``: ServerConfig fields, and EngineConfig fields for its
    engine."""
    base = dict(
        model=str(model_dir),
        adapter_root=adapter_root,
        data_dir=Path(tmp) / "data",
        host="127.0.0.1",
        port=0,
        http_port=0,
        device="cpu",
        dtype="float32",
    )
    options = {**base, **overrides}
    engine = {f.name: options.pop(f.name) for f in fields(EngineConfig) if f.name in options}
    return ServerConfig(**options, engine=EngineConfig(**engine))


def tiny_llama(tmp_path: Path, *, seed: int = 0, name: str = "tiny-llama", **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM + tokenizer under ``tmp_path/name``; return its dir."""
    model_dir = Path(tmp_path) / name
    if not (model_dir / "config.json").exists():
        save_tiny_llama(model_dir, seed=seed, **{**TINY_CONFIG, **overrides})
    return model_dir


def make_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    scale: float = 1.0,
) -> Path:
    """Write a real PEFT LoRA adapter for ``model_dir`` into ``out_dir``; return ``out_dir``.

    ``scale`` multiplies PEFT's random init of A and B, for adapters that change more.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_engine(
    model_dir: Path,
    adapter_root: Path,
    *,
    budget_bytes: int = 1 << 30,
    device: str = "cpu",
    dtype: str = "float32",
    **config,
):
    """A started engine over ``model_dir`` with adapters under ``adapter_root``; ``config``:
    EngineConfig fields. Stop it with ``engine.stop()``."""
    from hotmerge.adapters.store import AdapterStore
    from hotmerge.engine import load_runner

    runner = load_runner(str(model_dir), device=device, dtype=dtype, config=EngineConfig(**config))
    store = AdapterStore(
        adapter_root,
        device=runner.device,
        dtype=runner.dtype,
        budget_bytes=budget_bytes,
        module_shapes=runner.module_shapes(),
    )
    engine = StoreEngine(runner, store)
    engine.start()
    return engine


class StoreEngine(Engine):
    """An engine for tests that submit requests naming an adapter id: the id becomes a lease
    from ``store`` as the request path makes it (the engine itself takes no store)."""

    def __init__(self, runner, store) -> None:
        super().__init__(runner)
        self.store = store

    def submit(self, request, *, lease=None, deadline=None):
        arrived = time.perf_counter()
        if lease is None and request.adapter_id is not None:
            lease = stored_adapter_lease(self.store, request.adapter_id)
        return super().submit(request, lease=lease, deadline=deadline, arrived=arrived)


def peft_greedy(
    model_dir: Path,
    adapter_dir: Path | None,
    prompt: str,
    max_new_tokens: int,
    *,
    device: str = "cpu",
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (raw logits) from transformers/PEFT generate (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model = model.to(device).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[t])
        for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def philox_pruning(model, adapter_names: Sequence[str], seed: int):
    """A stand-in for PEFT's ``merge_utils.random_pruning`` (a torch.bernoulli DARE mask) that
    draws hotmerge's Philox stream, so PEFT's dare_*_svd can be compared exactly: each ΔW it
    prunes is found among the adapters' ΔWs (``model``: a PeftModel holding them), which names
    its (module index in its adapter, adapter position in the merge)."""
    from hotmerge_kernels.merge.reference import dare_keep

    known = []
    for position, name in enumerate(adapter_names):
        modules = sorted(
            path.removeprefix("base_model.model.")
            for path, m in model.named_modules()
            if hasattr(m, "lora_A") and name in m.lora_A
        )
        for k, module in enumerate(modules):
            layer = model.base_model.model.get_submodule(module)
            known.append((layer.get_delta_weight(name), position, k))

    def random_pruning(tensor, density, rescale):
        position, k = next((p, k) for d, p, k in known if torch.equal(d, tensor))
        local = torch.arange(tensor.numel())
        keep = dare_keep(seed, position, torch.tensor(k), local, density)
        pruned = tensor * keep.view(tensor.shape)
        return torch.div(input=pruned, other=density) if rescale else pruned

    return random_pruning
