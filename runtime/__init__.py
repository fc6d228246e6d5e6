"""cscompile.runtime: run a bundle — verify it, route each prompt, decode on its class path.

    session = load("bundle/")               # or a model (named, HF dir): dense only
    result = session.generate("Once upon a time", max_new_tokens=32)
    result.text, result.class_id, result.decode_tokens_per_s
    results = session.generate_batch(["a", "b"], batch_size=8)  # rows sharing a class batch
"""
from .generate import Result
from .refine import RefineConfig
from .session import Session, load

__all__ = ["load", "Session", "Result", "RefineConfig"]
