"""``ciliate``: the command line (inspection, CNI install, benchmarks, lab)."""
