"""What the CLI, the demo and ``dev`` share: runs through Dagster, status, metrics, KPIs."""
