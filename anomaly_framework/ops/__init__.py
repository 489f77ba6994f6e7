"""Tensor operations that models and metrics share: Gaussian smoothing and map upsampling."""
