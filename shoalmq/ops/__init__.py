"""Operating a node: metrics, the HTTP API and dashboard, and the $SYS topics."""
