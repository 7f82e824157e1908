"""A checkpoint transformers saved with bitsandbytes, in 4-bit NF4 (QLoRA's base) or 8-bit, loads
as stored: its projections are the weights written, the logits are transformers' on those
weights dequantized, and other quantized checkpoints are refused with the way out.

bitsandbytes is not installed here, so the checkpoints are written in its layouts (the state
dicts of ``Linear4bit``, its ``QuantState`` packed for safetensors, and of ``Linear8bitLt``; the
config's ``quantization_config``): NF4 from ``quantize_nf4``, which equals bitsandbytes'
``quantize_4bit`` bit for bit (tests/kernels/test_quant.py); 8-bit as its
``int8_vectorwise_quant`` writes them (``round(w · 127 / absmax)``, the row absmax as SCB)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.config import EngineConfig
from hotmerge.engine.loader import load_runner
from hotmerge.errors import InvalidArgument
from hotmerge_kernels.quant.formats import Int8Weight, nf4_code, quantize_nf4
from hotmerge_kernels.quant.reference import dequantize
from safetensors.torch import save_file

from tests.helpers import tiny_llama

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_NF4 = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
}


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def save_quantized(model_dir, out_dir, quantization_config: dict, quantized, write):
    """``model_dir``'s model as transformers saves it quantized: ``quantization_config`` in its
    config, each ``quantized`` linear's weight replaced by ``write(weight key, weight)``'s
    tensors (keyed by name), the rest as it was."""
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, tensor in hf_model(model_dir).state_dict().items():
        module = name.removesuffix(".weight")
        if module.split(".")[-1] not in quantized or not name.endswith(".weight"):
            tensors[name] = tensor.contiguous()
        else:
            tensors.update(write(name, tensor))
    for stale in out_dir.glob("*.safetensors"):
        stale.unlink()
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def save_bnb_nf4(model_dir, out_dir, double_quant: bool, quantized=PROJ):
    """Saved with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=double_quant)``: the ``quantized`` linears in NF4 (transformers
    keeps lm_head 16-bit)."""

    def write(name, weight):
        qw = quantize_nf4(weight, double_quant=double_quant)
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(qw.shape)}
        tensors = {
            name: qw.packed.reshape(-1, 1),  # bitsandbytes' (N·K/2, 1) bytes
            f"{name}.quant_map": nf4_code("cpu").clone(),
        }
        if double_quant:
            tensors[f"{name}.absmax"] = qw.qabsmax
            tensors[f"{name}.nested_absmax"] = qw.absmax2
            tensors[f"{name}.nested_quant_map"] = qw.code2.clone()
            state.update(
                nested_blocksize=256, nested_dtype="float32", nested_offset=qw.offset.item()
            )
        else:
            tensors[f"{name}.absmax"] = qw.absmax
        packed_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        tensors[f"{name}.quant_state.bitsandbytes__nf4"] = packed_state
        return tensors

    quant = {**BNB_NF4, "bnb_4bit_use_double_quant": double_quant}
    return save_quantized(model_dir, out_dir, quant, quantized, write)


def int8_of(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, SCB) as bitsandbytes' ``int8_vectorwise_quant`` computes them."""
    scb = w.abs().amax(dim=1)
    return torch.round(w * (127 / scb[:, None])).to(torch.int8), scb


def int8_dequantized(w: torch.Tensor) -> torch.Tensor:
    """As bitsandbytes' ``int8_vectorwise_dequant``: ``q · SCB · (1/127)``."""
    q, scb = int8_of(w)
    return q.float() * scb[:, None] * 7.874015718698502e-3


def save_bnb_int8(model_dir, out_dir):
    """Saved with ``load_in_8bit=True``: every projection's codes, SCB and weight format."""

    def write(name, weight):
        module = name.removesuffix(".weight")
        q, scb = int8_of(weight)
        weight_format = torch.tensor(0, dtype=torch.uint8)
        return {name: q, f"{module}.SCB": scb, f"{module}.weight_format": weight_format}

    quant = {**BNB_NF4, "load_in_4bit": False, "load_in_8bit": True}
    return save_quantized(model_dir, out_dir, quant, PROJ, write)


def dequantized_copy(model, of):
    """transformers' model with each projection ``of(weight)``, its quantized-then-dequantized
    self."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name in PROJ:
                parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                proj = getattr(parent, name)
                proj.weight.copy_(of(proj.weight))
    return model


def engine_config(**fields) -> EngineConfig:
    return EngineConfig(max_batch_size=2, block_size=4, kv_cache_tokens=256, **fields)


def logits_of(runner, ids: list[int]) -> torch.Tensor:
    """Prefill of the first 8 tokens, then one decode step per token after them."""
    table = list(range(1, 9))
    logits, _ = runner.prefill([PrefillChunk(0, ids[:8], 0, table, -1, True)])
    rows = [logits[0]]
    for position in range(8, len(ids)):
        rows.append(runner.decode([DecodeRow(0, ids[position], position, table, -1)])[0])
    return torch.stack(rows)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_bitsandbytes_nf4_checkpoint_serves_its_own_weights(tmp_path, double_quant, caplog):
    model_dir = tiny_llama(tmp_path)
    bnb_dir = save_bnb_nf4(model_dir, tmp_path / "bnb", double_quant)
    caplog.set_level("INFO", logger="hotmerge.engine.runner")
    runner = load_runner(str(bnb_dir), device="cpu", dtype="float32", config=engine_config())
    assert runner.model.quant == "nf4" and "base quantized to nf4" in caplog.text

    original = hf_model(model_dir)
    layer, loaded = original.model.layers[1], runner.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    for got, parts in (
        (loaded.qkv_weight, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (loaded.o_weight, [attn.o_proj]),
        (loaded.gate_up_weight, [mlp.gate_proj, mlp.up_proj]),
        (loaded.down_weight, [mlp.down_proj]),
    ):  # the weights written, bit for bit (stacked ones with their double quantization decoded)
        want = torch.cat([dequantize(quantize_nf4(p.weight, double_quant)) for p in parts])
        assert torch.equal(dequantize(got), want)
    assert (loaded.o_weight.absmax is None) == double_quant  # kept as stored where not stacked

    ids = torch.randint(3, 250, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = dequantized_copy(hf_model(model_dir), lambda w: dequantize(quantize_nf4(w, double_quant)))
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0, 7:].float()
        unquantized = original(torch.tensor([ids])).logits[0, 7:].float()
        got = logits_of(runner, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - unquantized).abs().max() > 1e-3  # NF4 did change the model


def test_a_bitsandbytes_8bit_checkpoint_serves_its_own_weights(tmp_path):
    model_dir = tiny_llama(tmp_path)
    runner = load_runner(
        str(save_bnb_int8(model_dir, tmp_path / "bnb8")),
        device="cpu",
        dtype="float32",
        config=engine_config(),
    )
    assert runner.model.quant == "int8"
    layer, loaded = hf_model(model_dir).model.layers[0], runner.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for got, parts in (
        (loaded.qkv_weight, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (loaded.down_weight, [mlp.down_proj]),
    ):  # bitsandbytes' dequantization, to float32 rounding
        assert isinstance(got, Int8Weight)
        want = torch.cat([int8_dequantized(p.weight) for p in parts])
        torch.testing.assert_close(dequantize(got), want, rtol=2.5e-7, atol=0)
    ids = torch.randint(3, 250, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = dequantized_copy(hf_model(model_dir), int8_dequantized)
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0, 7:].float()
        got = logits_of(runner, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_stored_nf4_equals_the_16bit_base_quantized_at_load(tmp_path):
    """Without double quantization, the NF4 checkpoint and its 16-bit base with --quantize nf4
    are the same weights: the same logits, exactly."""
    model_dir = tiny_llama(tmp_path)
    bnb_dir = save_bnb_nf4(model_dir, tmp_path / "bnb", double_quant=False)
    ids = torch.randint(3, 250, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    stored = load_runner(str(bnb_dir), device="cpu", dtype="float32", config=engine_config())
    at_load = load_runner(
        str(model_dir), device="cpu", dtype="float32", config=engine_config(quantize="nf4")
    )
    assert stored.eos_token_ids == at_load.eos_token_ids
    with torch.inference_mode():
        assert torch.equal(logits_of(stored, ids), logits_of(at_load, ids))


def test_other_quantized_checkpoints_and_double_quantizing_are_refused(tmp_path):
    model_dir = tiny_llama(tmp_path)
    bnb_dir = save_bnb_nf4(model_dir, tmp_path / "bnb", double_quant=False)
    with pytest.raises(InvalidArgument, match="quantize it twice"):
        load_runner(str(bnb_dir), device="cpu", config=engine_config(quantize="int8"))
    for quant, kind in (
        ({**BNB_NF4, "bnb_4bit_quant_type": "fp4"}, r"bitsandbytes, fp4"),
        ({"quant_method": "gptq", "bits": 4}, r"gptq"),
        ({"quant_method": "awq", "bits": 4}, r"awq"),
    ):
        config = json.loads((bnb_dir / "config.json").read_text())
        config["quantization_config"] = quant
        (bnb_dir / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidArgument, match=rf"saved quantized \({kind}\).*--quantize nf4"):
            load_runner(str(bnb_dir), device="cpu", config=engine_config())


def test_a_quantized_lm_head_is_refused(tmp_path):
    model_dir = tiny_llama(tmp_path)
    bnb_dir = save_bnb_nf4(model_dir, tmp_path / "bnb", False, quantized=(*PROJ, "lm_head"))
    with pytest.raises(InvalidArgument, match="lm_head is saved in nf4; only the projections"):
        load_runner(str(bnb_dir), device="cpu", config=engine_config())


def test_a_config_that_says_nf4_over_16bit_weights_is_refused(tmp_path):
    """The config claims bitsandbytes NF4, the weights are 16-bit: said, not served as NF4."""
    model_dir = tiny_llama(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = BNB_NF4
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="no nf4 weights"):
        load_runner(str(model_dir), device="cpu", config=engine_config())
