"""``ciliate-operator``: cluster-pool IPAM, one place in the cluster that
cuts the cluster CIDRs into per-node pod CIDRs."""
