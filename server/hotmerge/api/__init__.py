"""The fronts: gRPC (``grpc_service``, ``grpc_wire``), LoRAX REST and OpenAI over HTTP
(``http_app``, translated by ``lorax`` and ``openai``); all of them call ``core``."""
