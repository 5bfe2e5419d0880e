"""Where models come from and how they load: sources and presets (torch-free), GGUF conversion and quantised
loading, shared weights, drafter heads (subset vocabulary, EAGLE, acceptance) and drafter checkpoints."""
