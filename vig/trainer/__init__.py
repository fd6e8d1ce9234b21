"""Layer 2, the trainer: what ``train.py`` runs (flags, data, loops, run folder, process group).

May import the models layer (``vig`` and its ``models``, ``checkpoint``, ``complexity``, ``errors``,
``console``) and ``gcn_lib``; nothing under ``vig.tools``. Nothing outside ``vig.tools`` imports it.
Internal: the modules here are not a public API.
"""
