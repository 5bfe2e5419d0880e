"""What runs the model: KV sessions and their paged caches, packed passes, the small-batch and quantised kernels
(their C sources beside them), GGUF blocks and the model runner."""
