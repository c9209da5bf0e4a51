"""What the quantize stage is built from: llama.cpp's conversion and quantization, and the checks that a
GGUF file matches the merged model."""
