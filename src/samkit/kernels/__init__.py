"""Optional GPU kernels (Triton); every one has a pure-torch fallback."""
