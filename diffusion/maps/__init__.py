"""Attention maps: aggregation over layers and steps, the file format, the pictures saved beside each image."""
