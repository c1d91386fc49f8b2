"""Network policy in the control plane: Kubernetes NetworkPolicy and the L3/L4 part of
CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, resolved into per-endpoint
policy entries in the datapath's terms (peer identity, protocol, port range, allow or
deny), the CIDR identities the ipcache needs, and a reference evaluator that makes the
same decision the BPF program makes. Pure Python: no kernel, no store."""
