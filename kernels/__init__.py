"""neox_l2e.kernels: Triton kernels (each beside its torch reference) and C++ helpers.

Installed from the top-level kernels/ folder under the namespaced import ``neox_l2e.kernels``.
"""
