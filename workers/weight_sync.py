"""Weight sync into a running vLLM engine: a worker extension class.

vLLM mixes this class into its worker class in the engine's worker process(es), named
by its qualified name: `EngineArgs(worker_extension_cls=WORKER_EXTENSION)`. The front
end then calls its methods by name through `LLMEngine.collective_rpc`.

The weights travel as safetensors bytes because `collective_rpc` serializes its
arguments with msgpack and does not rebuild tensors (they arrive as nested lists), and
shipping a pickled function would need vLLM's insecure-serialization flag.
"""

from __future__ import annotations

import safetensors.torch

WORKER_EXTENSION = f"{__name__}.WeightSyncExtension"


class WeightSyncExtension:
    def load_weights_from_bytes(self, data: bytes | bytearray) -> int:
        """Load checkpoint-format weights (HF names) in place; returns the tensor count."""
        from vllm.platforms import current_platform

        tensors = safetensors.torch.load(bytes(data) if not isinstance(data, bytes) else data)
        # Not `model.load_weights`: on CPU the backend repacks linear weights into its
        # kernel layout after loading and leaves the original parameters empty, so a
        # plain load_weights writes into nothing. `reload_weights` (vLLM's Worker, 0.32)
        # re-runs the layer-wise load-and-process path.
        self.reload_weights(weights_iterator=iter(tensors.items()))
        if current_platform.is_cpu():
            # vLLM 0.32 on CPU: the LM head computes logits with a packed copy of its
            # weight (`cpu_linear`, made by process_weights_after_loading). With tied
            # embeddings no checkpoint tensor is loaded into the head itself, so the
            # reload never re-packs it and logits would keep using the old embedding.
            lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
            if lm_head is not None and hasattr(lm_head, "cpu_linear"):
                lm_head.quant_method.process_weights_after_loading(lm_head)
        return len(tensors)
