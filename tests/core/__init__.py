"""Tests of core/: safetensors headers, checkpoints."""
