"""The gRPC runtime: servers, channels and interceptors, messages to and from tensors, the client, and the
generator of the stubs in specdec/v1."""
