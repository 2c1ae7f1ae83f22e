"""moe_ext.bench: `python -m moe_ext.bench`, the benchmark suite (see __main__.py and docs/benchmarks.md).

Modules: shapes (models, token counts, routing, the case plan), suites (inputs, implementations,
checks, FLOP/byte counts), baselines (PyTorch, grouped_mm, transformers, staged moe_ext), timing
(interleaved medians, CUDA graphs, ceilings, profiler), report (table, JSON, CSV, plots).
"""
