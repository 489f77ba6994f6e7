"""Frozen pretrained backbones: where their weights come from, and the feature extractors built on them."""
