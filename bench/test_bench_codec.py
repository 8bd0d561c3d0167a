"""The MQTT codec, compiled vs pure Python (run: make bench).

The batched front end of a later stage decodes every frame of a socket read in one ``decode`` call, and encodes a
turn's acks and deliveries with one call each. The figures per frame are what one `$queue/` message costs there:
its PUBLISH parsed, its PUBACK encoded, its delivery encoded.

Each round is one call over FRAMES (1,000) PUBLISH frames, or BATCH (500) acks or deliveries; the ns per frame are
the round time divided by the frames in the round (``extra_info``).
"""

import pytest

from shoalmq._native import mqtt_codec, mqtt_codec_py

FRAMES = 1000  # QoS 1 PUBLISH frames in the buffer decode parses per round: µs per round == ns per frame
BATCH = 500  # packet ids per encode_acks round, deliveries per encode_publishes round
TOPIC = b"$queue/orders"
MAX_PACKET_SIZE = 1 << 20
PUBLISHES = mqtt_codec_py.encode_publishes([(TOPIC, bytes([i % 256]) * 100, i + 1, False) for i in range(FRAMES)])
ACK_IDS = list(range(1, BATCH + 1))
DELIVERIES = [(TOPIC, bytes([i % 256]) * 100, i + 1, False) for i in range(BATCH)]

IMPLEMENTATIONS = [pytest.param(mqtt_codec, id="native"), pytest.param(mqtt_codec_py, id="pure")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decode_1000_qos1_publishes(benchmark, impl) -> None:
    benchmark.extra_info["frames_per_round"] = FRAMES
    packets, consumed = benchmark(impl.decode, PUBLISHES, MAX_PACKET_SIZE)
    assert consumed == len(PUBLISHES) and len(packets) == FRAMES
    assert packets[-1] == (3, 2, "$queue/orders", FRAMES, bytes([(FRAMES - 1) % 256]) * 100)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_acks_500(benchmark, impl) -> None:
    benchmark.extra_info["frames_per_round"] = BATCH
    data = benchmark(impl.encode_acks, 4, ACK_IDS)
    assert len(data) == 4 * BATCH and data[-4:] == b"\x40\x02\x01\xf4"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_publishes_500(benchmark, impl) -> None:
    benchmark.extra_info["frames_per_round"] = BATCH
    data = benchmark(impl.encode_publishes, DELIVERIES)
    assert len(data) == BATCH * (2 + 2 + len(TOPIC) + 2 + 100)
    assert data == mqtt_codec_py.encode_publishes(DELIVERIES)
