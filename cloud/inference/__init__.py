"""The cloud fallback inference service: KServe v2 REST and gRPC over a dynamic batcher."""
