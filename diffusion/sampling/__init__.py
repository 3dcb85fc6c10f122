"""Sampling: the settings, the loop over a diffusers scheduler with per-step hooks, layout guidance, the pipeline, batch generation."""
