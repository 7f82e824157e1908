"""The serving step's operators: multi-LoRA shrink/expand, paged attention, fused elementwise."""
