"""visalign: align diffusion and flow models (and text LLMs) with preferences."""

__version__ = "0.1.0"
