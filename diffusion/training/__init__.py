"""Training: preparation, the objective and grounding loss, the text-state strategies, the loop, checkpoints, validation, export."""
