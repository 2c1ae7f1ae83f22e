"""Integrations of moe_ext with other libraries (imported on demand: moe_ext.integrations.transformers)."""
