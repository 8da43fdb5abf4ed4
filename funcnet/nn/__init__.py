"""The layer families, one module each: the ops, their hand-written rules, the layers,
their layer rules and metadata, read top to bottom like a slide.

``base`` (the protocol), ``dense``, ``conv``, ``pool``, ``activation``, ``reshape``,
``normalization``, ``dropout``, ``embedding``, ``combinators``, ``losses``,
``regularizers``. Users reach them through ``funcnet`` (``fn.Conv``), ``fn.ops``,
``fn.vjp``, ``fn.layers``, ``fn.losses`` and ``fn.regularizers``.
"""
