"""The project's own small text-to-image reference model (issue #4): data, captions, model, training, analyzer.

Needs the ``[demo]`` extra (diffusers, transformers, scikit-image); the node
pack never imports this package.  See ``reference/MODEL_CARD.md``.
"""
