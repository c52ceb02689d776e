"""The server's tools: doctor, demo (`make run`), benchmarks."""
