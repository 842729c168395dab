"""The CPU fp32 fast paths, each beside its plain reference."""
