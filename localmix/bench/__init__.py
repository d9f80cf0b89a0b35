"""Benchmarks with llama-bench's semantics: params (the sweep), run (pp / tg on the Engine), chat
(a chat turn through Engine.stream), report (tables, llama-bench's formats, plot), roofline and
history (the store's record and --compare)."""
