"""The node agent (``ciliate-agent``): one process per node that owns the
node's datapath, IPAM, identities and endpoints, and serves them over an
HTTP API on a UNIX socket."""
