"""Tensor operations that models and metrics share: Gaussian smoothing, map upsampling, maps of differing sizes."""
