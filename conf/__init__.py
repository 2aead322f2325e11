"""Hydra configs of ``nvfp4-qat``, installed as the package ``nvfp4_qat.conf``.

This ``__init__.py`` makes the directory an importable package, which is what Hydra's
``pkg://nvfp4_qat.conf`` search-path entry needs. The ``recipe`` group is the repository's
top-level ``recipes/`` directory (``conf/recipe`` links to it; wheels contain a copy).
"""
