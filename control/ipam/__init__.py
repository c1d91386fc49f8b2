"""Node pod-CIDR IPAM: a Kubernetes-style CIDR set and Cilium's cluster-pool allocator."""

from .cidrset import (
    CidrMaskError,
    CidrOutOfRangeError,
    CidrSet,
    CidrSetError,
    CidrSetFullError,
    Network,
)
from .cluster_pool import (
    CidrConflictError,
    CidrNotInPoolError,
    ClusterPool,
    InvalidCidrError,
    NodeCidrs,
    PoolConfigError,
    PoolError,
    PoolExhaustedError,
)
from .host import (
    HostIpam,
    IpamConfigError,
    IpamError,
    IpamExhaustedError,
    IpamOwnerError,
    PoolUsage,
)

__all__ = [
    "CidrConflictError",
    "CidrMaskError",
    "CidrNotInPoolError",
    "CidrOutOfRangeError",
    "CidrSet",
    "CidrSetError",
    "CidrSetFullError",
    "ClusterPool",
    "HostIpam",
    "InvalidCidrError",
    "IpamConfigError",
    "IpamError",
    "IpamExhaustedError",
    "IpamOwnerError",
    "Network",
    "NodeCidrs",
    "PoolConfigError",
    "PoolError",
    "PoolExhaustedError",
    "PoolUsage",
]
