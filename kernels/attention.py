"""Placeholder until the Triton kernel lands: delegates to the eager reference."""

from kernels.reference import flash_attention

__all__ = ["flash_attention"]
