"""Real container runtimes (podman, containerd CRI) run inside lab namespaces,
for end-to-end tests of CNI plugins: the reference plugins now, ciliate's
``ciliate-cni`` the same way."""

from ciliate.control.lab.runtime.common import CommandError, RuntimeUnavailable

__all__ = ["CommandError", "RuntimeUnavailable"]
