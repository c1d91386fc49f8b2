"""Security identities: numbers derived from label sets, allocated in the
store (the node's SQLite or the cluster's etcd), reserved ones below 256."""
