"""Where the agent and the ``ciliate-cni`` relay meet when nobody says.

The one place the default agent socket is written: the agent listens there,
the CLI's client calls it, and CMake reads the line below (by its exact
form ``DEFAULT_AGENT_SOCKET = "..."``) to compile the same default into the
C relay (``shim/ciliate_cni.c``), which runs without Python.
"""

DEFAULT_AGENT_SOCKET = "/run/ciliate/agent.sock"
# A pod's MTU when neither the netconf (``mtu``) nor the agent (``--mtu``) says.
DEFAULT_MTU = 1500
