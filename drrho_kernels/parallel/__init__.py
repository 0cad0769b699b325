"""Several processes: the collectives the package uses (``collectives``), the two distributed schemes and
the ranks' agreement (``schemes``), and the per-sample state spread over the ranks (``sharded_state``)."""
