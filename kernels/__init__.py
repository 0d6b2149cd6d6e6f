"""Triton kernels and their launchers; installed as vpfast.kernels."""
