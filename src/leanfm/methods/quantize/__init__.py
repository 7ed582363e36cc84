"""Weight quantization methods."""
