"""The MQTT front end: accepts client connections and serves them with amqtt.

``$queue/`` topics are routed to the queue manager (``shoalmq.queue``); every other topic is plain MQTT 3.1.1.
"""

from shoalmq.broker.frontend import MqttFrontEnd

__all__ = ["MqttFrontEnd"]
