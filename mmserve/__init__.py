"""mmserve: disaggregated serving for multimodal LLMs (shared code used by every service)."""

__version__ = "0.1.0"
