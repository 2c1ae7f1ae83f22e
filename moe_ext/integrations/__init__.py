"""Integrations of moe_ext with other libraries. moe_ext.integrations.transformers imports
transformers only when its functions are called."""
from . import transformers  # noqa: F401
