"""Durable, partitioned work queues: the queue manager, its partitions and their storage.

Knows nothing of MQTT; reaches other nodes only through a small router interface that ``shoalmq.cluster``
implements.
"""
