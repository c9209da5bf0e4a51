"""Tools that use what the pipeline made: chat and generate, an OpenAI-compatible server, the Ollama /
LM Studio hand-off files, the benchmark report and the check against published metrics."""
