"""Packed weight formats, execution backends and exporters."""
