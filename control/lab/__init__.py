"""The lab: nodes, pods, a top-of-rack and etcd as network namespaces and
processes this package creates and removes. Never imported by production
code; it drives the real agent, operator and CNI plugin from outside."""
