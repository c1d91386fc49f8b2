"""The CNI side of ciliate: the contract between the CNI protocol handler
and the agent's endpoint service, the handler itself, and installation."""
