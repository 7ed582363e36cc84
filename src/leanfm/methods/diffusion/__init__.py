"""Techniques for diffusion denoisers (issue 19): fewer sampling steps, feature caching across
steps (DeepCache), int8 weights in the runtime that runs the denoiser."""
