"""Token Distillation: attention-aware input embeddings for new tokens.

Implements the method of Dobler, Elliott and de Melo, "Token Distillation: Attention-aware Input
Embeddings for New Tokens" (arXiv 2505.20133). Entry point: ``apply_embedding_init.py``;
library entry point: :func:`token_distillation.pipeline.run`; an adapter written by
``--export peft`` is applied to the source model with :func:`token_distillation.load_adapter`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_adapter":  # imported on first use (keeps ``import token_distillation`` light)
        from .export import load_adapter

        return load_adapter
    raise AttributeError(f"module 'token_distillation' has no attribute {name!r}")
