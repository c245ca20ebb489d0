"""Enclave gateway: an MCP gateway that contains AI agents."""

__version__ = "0.1.0"
