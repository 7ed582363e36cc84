"""Per-layer mixed-precision weight quantization (sensitivity scores + a knapsack over formats)."""
