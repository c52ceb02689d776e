"""FIM evaluation: benchmark data (benchmarks/), suites, sandbox, cross-file set, reuse quality."""
