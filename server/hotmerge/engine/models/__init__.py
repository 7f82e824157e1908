"""Model forwards: our own Llama family (``llama``) and transformers' eager path (``hf_eager``)."""
