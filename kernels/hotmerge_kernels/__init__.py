"""hotmerge_kernels: the device code of hotmerge, each kernel beside its torch twin.

- ``layout``: one flat buffer per adapter (what both domains read).
- ``merge/``: merging adapters (the contract, the torch twin, the Triton kernels, thresholds,
  plans, ΔW-space merges).
- ``ops/``: the serving step's operators (multi-LoRA, paged attention, fused elementwise ops).
"""
