"""Cluster coordination: etcd membership, partition assignment, and the gRPC transport between nodes."""
