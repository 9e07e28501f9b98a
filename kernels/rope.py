"""Placeholder until the Triton kernel lands: delegates to the eager reference."""

from kernels.reference import apply_rope

__all__ = ["apply_rope"]
