"""The runtime around the compiled forward: KV cache, scheduler, sampler, engine."""
