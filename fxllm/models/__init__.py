"""Model loading (HF folder, safetensors, GGUF), the model registry, presets."""
