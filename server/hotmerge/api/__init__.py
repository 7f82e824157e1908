"""The fronts: gRPC (``grpc_service`` on ``grpc_server``'s event loop, ``grpc_messages``,
``grpc_wire``, ``async_handle``), LoRAX REST and OpenAI over HTTP
(``http_app`` assembling ``routes_lorax``, ``routes_openai``, ``routes_admin`` on
``http_common``; translated by ``lorax`` and ``openai``); all of them call ``core``, which
checks every request with the rule book (``hotmerge.request_rules``)."""
