"""A self-contained HTML page to explore saved attention maps."""
