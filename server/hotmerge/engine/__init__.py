"""The serving engine: requests, scheduler, paged KV cache, adapter pool, runner, sampling.

| module | owns |
| --- | --- |
| requests | the adapter lease, the handle a caller waits on |
| scheduler | queue, admission (KV blocks, batch size, adapter slots), the step loop; no tensors |
| batch | prefill chunks / decode rows, and the fixed-address buffers captured graphs read |
| kv_cache | the paged block pool: reservations, blocks, usage; the cache tensors |
| runner | loading; prefill and decode replayed from CUDA graphs per padded size |
| models | our Llama-family forward; transformers' eager forward for other architectures |
| lora | the adapter pool (stacked slots) and the per-batch LoRA call |
| ops | each operator dispatched to its Triton kernel (CUDA) or torch twin |
| sampling | batched sampling on the device, per-request seeds |
| detok | incremental detokenization, stop sequences |
"""

from hotmerge.engine.requests import AdapterLease, GenerationHandle
from hotmerge.engine.runner import EngineLimits, ModelRunner, load_runner
from hotmerge.engine.scheduler import Engine, EngineStats

__all__ = [
    "AdapterLease",
    "Engine",
    "EngineLimits",
    "EngineStats",
    "GenerationHandle",
    "ModelRunner",
    "load_runner",
]
