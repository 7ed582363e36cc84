"""Structured pruning: remove whole decoder layers (``layerdrop``) or attention-head groups and
MLP channels (``width``). Both shrink the tensors and the Hugging Face config, so the result is a
plain, smaller checkpoint that reloads with ``transformers.AutoModelForCausalLM.from_pretrained``.
"""
