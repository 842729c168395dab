"""Checkpoints in and out: Hugging Face directories, quantize-on-load, the NF4 codec and layer, GGUF, the offline hub."""
