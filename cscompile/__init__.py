"""cscompile: compressed-sensing-guided structured reduction compiler for causal LMs."""
__version__ = "0.1.0"
