"""The control loops both the operator (on Kubernetes) and `triphase up` (locally) run: the role
balancer (worker roles, in seconds) and, next, the planner (pool sizes, in minutes). Policies are
pure functions of snapshots; the loops and actuators around them do the I/O."""
