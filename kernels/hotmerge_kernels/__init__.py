"""hotmerge_kernels: LoRA adapter layout, merge engine (Triton kernels + torch reference twins)."""
