"""Techniques for vision transformers (issue 19): token merging."""
