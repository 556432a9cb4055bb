"""moec: an ahead-of-time compiler for sparse Mixture-of-Experts models on Apache TVM."""

__version__ = "0.1.0"
