"""hotmerge: a gRPC server that generates with LoRA adapters merged on the fly."""

__version__ = "0.1.0"
