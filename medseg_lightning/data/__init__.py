"""Data layer: reading, manifests, splits, preprocessing cache, datasets and checks."""
