"""Captioned images: the built-in shapes dataset and any image folder in the imagefolder layout."""
