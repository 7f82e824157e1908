"""The serving step's operators: multi-LoRA shrink/expand, paged decode and prefill attention,
fused elementwise ops; the torch twins of all of them in ``reference``."""
