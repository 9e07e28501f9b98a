"""Placeholder until the Triton kernel lands: delegates to the eager reference."""

from kernels.reference import swiglu

__all__ = ["swiglu"]
