"""Benchmarks: the engine side by side with what users would otherwise write, and with the
machine's memory limit (DESIGN.md section 7). Run them with ``make bench``; see RESULTS.md."""
