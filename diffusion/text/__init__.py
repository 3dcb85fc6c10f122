"""From prompt to text states: tokenizer, tiny CLIP, the encoder wrapper, token -> word alignment, the relation grammar."""
