"""crossattn-diffusion: a small text-to-image diffusion model whose cross-attention you can look inside."""
