"""The wire formats: LoRAX REST and OpenAI over HTTP (``http_app``), translated by ``lorax`` and
``openai``; all of them, and the gRPC servicer (``hotmerge.service``), call ``core``."""
