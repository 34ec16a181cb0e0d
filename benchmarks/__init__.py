"""Benchmarks of the moe_tf layer (run as modules: `python -m benchmarks.layer_bench`)."""
