"""Speed and memory benchmarks behind `mergevq benchmark` (numbers live here, never in timed tests)."""
