"""The sampler settings every entry point starts from (sample.py, evaluate, the pipeline, training's
validation and export), in one place so they cannot drift apart. Light: no torch import.

DDPM's ancestral steps add fresh noise at every step (drawn from each image's own generator, so an
image still regenerates alone from its seed). On the default model they copy objects far less often
than deterministic DDIM, and more so with more steps (BENCHMARKS.md, "Sampler").
"""

SCHEDULER = "ddpm"
STEPS = 100
GUIDANCE = 3.0
