"""sae-vision: sparse autoencoders on InceptionV1's early vision layers."""

__version__ = "0.1.0"
