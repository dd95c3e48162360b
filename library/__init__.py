"""Shared code of the SDXL LoRA trainer and generator (see README, Architecture)."""
