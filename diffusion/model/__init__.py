"""The network: our attention layers and the text-conditioned UNet built from them."""
