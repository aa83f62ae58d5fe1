"""Online (River) and offline (scikit-learn) segmentation models."""
