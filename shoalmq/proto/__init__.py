"""The gRPC service definitions between nodes (``.proto`` sources) and their generated Python code."""
