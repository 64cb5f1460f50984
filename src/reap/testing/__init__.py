"""Tiny generated checkpoints of every MoE type and format, for `reap demo` and the tests (tiny, tiny_configs, tiny_formats)."""
