"""The paper's benchmarks as data: one YAML file per table or figure, read by `rmt-bench-suite`."""
