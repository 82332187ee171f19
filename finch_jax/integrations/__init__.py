"""FINCH inside other training frameworks.

Each submodule imports its framework at its top, so import the one you use
(`finch_jax.integrations.tunix` needs `pip install -e ".[tunix]"`); `import finch_jax` imports
none of them.
"""
