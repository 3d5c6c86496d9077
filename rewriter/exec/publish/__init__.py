"""Publishing and checking an output: verify, pruning.json, the model card."""
