"""Token Distillation: attention-aware input embeddings for new tokens.

Implements the method of Dobler, Elliott and de Melo, "Token Distillation: Attention-aware Input
Embeddings for New Tokens" (arXiv 2505.20133). Entry point: ``apply_embedding_init.py``;
library entry point: :func:`token_distillation.pipeline.run`.
"""

__version__ = "0.1.0"
