"""The online models (engine-free).

Features, segmentation, propensity, drift, tracks, portable snapshots, the model registry.
"""
