"""ShoalMQ: an MQTT broker whose ``$queue/`` topics are durable, partitioned work queues."""

__version__ = "0.1.0"
