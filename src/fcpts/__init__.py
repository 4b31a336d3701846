"""fcpts: fast and controllable post-training sparsity (Gong et al., AAAI 2024)."""

__version__ = "0.1.0"
