"""Services, control-plane half: the EndpointSlice controller (Services with a
selector -> the slices of the pods they select), the service table (Services and
EndpointSlices -> the frontends and backends a node's datapath serves) and the
numeric service and backend ids the datapath keys them by, kept stable across
recomputation and agent restarts.

Pure functions of the objects wherever possible, with incremental forms that keep
their state between passes so a pass costs what changed (:mod:`.changes` says what
changed since the last pass; ``SliceController`` and ``NodeTable`` recompute only
the Services it touches); the agent (a lone node) or the operator (a cluster) runs
the controller, and the agent the table.
ClusterIP and NodePort allocation happen in the apply transaction, in
:mod:`ciliate.control.objects.allocation`.
"""
