"""cscompile: compressed-sensing-guided structured reduction compiler for causal LMs."""
__version__ = "0.1.0"


def load(path, **kw):
    """Open a bundle (or a model) for generation: see cscompile.runtime.load."""
    from .runtime import load as _load

    return _load(path, **kw)
