"""hotmerge_kernels: the device code of hotmerge. Start here; each module's docstring holds its
contract.

- ``layout``: one flat buffer per adapter (``FlatAdapter``), what both domains read.
- ``backend``: the one switch between Triton and the torch twins (``use_triton``), and the
  kernels' environment (``HOTMERGE_TRITON``, ``HOTMERGE_PDL``, ``HOTMERGE_FP8_MATMUL``,
  ``TRITON_INTERPRET``), read there once.
- ``lru``: ``LockedLRU``, the one cache kept at module level (plans, launch and address
  tables), safe under the server's concurrent merges.
- ``merge/``: merging adapters. ``contract`` (``merge_adapters``, the PEFT-equivalent contract,
  validation), ``params`` (strategies), ``plan`` (where each output element comes from),
  ``reference`` (torch twins, Philox/DARE stream), ``triton_merge`` (element-wise, cat and slerp
  kernels), ``thresholds`` (trim thresholds on the device), ``tables`` (device address tables),
  ``delta`` (ΔW-space merges: combine, then factorise).
- ``ops/``: the serving step's operators. ``lora`` (+ ``lora_triton``: multi-LoRA shrink /
  expand), ``paged_attention`` (decode), ``prefill_attention``, ``fused`` (RMSNorm, RoPE + KV
  write, SiLU·mul), ``pdl`` (programmatic dependent launch), ``reference`` (torch twins).
- ``quant/``: quantized base weights (``--quantize``). ``formats`` (nf4, int4, int8, fp8 and
  ``quantize``), ``linear`` (``qlinear``, ``dequantize``: Triton entry points), ``triton_qlinear``
  (the skinny GEMM and dequantize kernels), ``reference`` (torch twins).

Where a torch twin lives: in its package's ``reference`` module, under the kernel's own name and
signature (``ops.reference.rms_norm`` twins ``ops.fused.rms_norm``; ``merge.reference`` and
``merge.triton_merge`` offer the same functions, so a merge picks a module as its engine). One
place per package, not one file per kernel or twins inline, because (1) a ``reference`` module
imports no Triton, so merges and the twins run where Triton is not installed; (2) the twins of a
package share helpers (checks, the Philox stream) that the Triton modules import from there,
never the reverse; (3) the Triton modules stay under ~450 lines. A new kernel: its launch in the
package's Triton module (or a new one), its twin of the same name in ``reference``, a test that
compares the two on fresh random inputs, and a branch on ``backend.use_triton`` where it is
called (``merge.contract`` or the server's ``engine/ops.py``).
"""
