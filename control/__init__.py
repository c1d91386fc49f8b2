"""ciliate control plane."""
