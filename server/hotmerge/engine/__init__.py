"""The serving engine: a loop, a scheduler, per-request state, and the runner on the device.

| module | owns |
| --- | --- |
| config | ``EngineConfig``: every engine limit and default, written once |
| requests | the adapter lease, the handle a caller waits on (rules: ``hotmerge.request_rules``) |
| engine | the worker thread, submit, the loop: schedule -> run -> postprocess -> emit |
| scheduler | pure policy: admission (batch, KV, slots, adapter writes), step plans, preemption |
| sequence | one request's state: prompt, tokens, blocks, slot, timings; its result |
| slots | the slot table: which adapter is in which slot, references, idle LRU |
| kv_cache | the paged cache tensors and their block layout |
| block_manager | the blocks' bookkeeping: prefix caching, growth by need, preemption victims |
| stats | counters and per-phase step times |
| loader | loading the tokenizer and model, and picking the runner |
| runner | the runner interface; our forward, prefill and decode replayed from CUDA graphs |
| models | our Llama-family forward; transformers' eager forward for other architectures |
| batch | prefill chunks / decode rows, and the fixed-address buffers captured graphs read |
| lora | the adapter slots' device storage (``write``) and the per-batch LoRA call |
| slot_write | copying an adapter into a slot in a few torch calls (a layer stack at a time) |
| ops | each operator dispatched to its Triton kernel (CUDA) or torch twin |
| sampling | batched sampling on the device, per-request seeds |
| detok | incremental detokenization, stop sequences |

Adapters reach the engine only as leases (resolved and pinned by ``hotmerge.api.core``).
"""

from hotmerge.engine.config import EngineConfig
from hotmerge.engine.engine import Engine
from hotmerge.engine.loader import load_runner
from hotmerge.engine.requests import AdapterLease, GenerationHandle
from hotmerge.engine.runner import ModelRunner
from hotmerge.engine.stats import EngineStats

__all__ = [
    "AdapterLease",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GenerationHandle",
    "ModelRunner",
    "load_runner",
]
