"""Token Distillation: attention-aware input embeddings for new tokens.

Implements the method of Dobler, Elliott and de Melo, "Token Distillation: Attention-aware Input
Embeddings for New Tokens" (arXiv 2505.20133). Entry points: ``apply_embedding_init.py`` (the
command line); :func:`token_distillation.distill` (a model and tokenizer in memory, returns
:class:`DistillResult`), configured by flags or the config objects (:class:`RunConfig` and its
stages, :class:`ConfigError` for bad input); an adapter written by ``--export peft`` is applied to
the source model with :func:`token_distillation.load_adapter`. Names are imported on first use
(keeps ``import token_distillation`` light).
"""

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first use)
_LAZY = {"distill": "api", "DistillResult": "api", "load_adapter": "export",
         **{n: "config" for n in ("RunConfig", "ModelConfig", "TargetConfig", "CorpusConfig", "SnippetConfig",
                                  "TrainConfig", "OutputConfig", "ConfigError")}}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'token_distillation' has no attribute {name!r}")
