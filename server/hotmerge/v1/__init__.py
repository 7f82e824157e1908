"""Generated gRPC stubs for hotmerge.v1 (`make proto`); see proto/hotmerge/v1/hotmerge.proto."""
