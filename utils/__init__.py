"""Shared code for the alpaca-lora scripts: one module per concern."""
