"""A node's part in the cluster: membership and endpoints in etcd, the
ipcache mirror of other nodes, and the BGP announcement of its pod CIDRs."""
