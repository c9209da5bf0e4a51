"""The small library every stage and tool shares: the recipe schema, one-line errors, atomic outputs,
provenance, model loading, HF inference, llama.cpp (GGUF) access and the models a command can run."""
