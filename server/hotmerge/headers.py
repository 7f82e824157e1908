"""The header names hotmerge reads and writes: HTTP headers and gRPC metadata alike (one
spelling, lower case, as gRPC requires). The server fronts and the Python client use these."""

# A request's id: the caller's (e.g. from a load balancer) or a fresh one, sent back on every
# answer (HTTP header; gRPC trailing metadata) so logs line up.
REQUEST_ID_HEADER = "x-request-id"
# A merge spec's affinity key: sent by the client with the request for a balancer to hash on,
# and in the answer to a merge-spec request beside the merge cache's key.
MERGE_KEY_HEADER = "x-merge-key"
MERGE_CACHE_KEY_HEADER = "x-merge-cache-key"
# Seconds an HTTP client gives its request (generation and merges); past it: 504. (gRPC callers
# set the call's own deadline.)
TIMEOUT_HEADER = "x-request-timeout"
# The API key (a server started with --api-key): "Bearer KEY", on HTTP and gRPC alike.
AUTHORIZATION_HEADER = "authorization"
