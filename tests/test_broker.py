"""The embedded broker hands a consumer only whole messages.

kombu's own file-system transport creates a message file empty and fills it afterwards; a
worker polling the folder could take it in between, fail to decode it and exit, taking
`make run` down with it. A producer and a consumer race on one folder here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

MESSAGES = 3000


def _options(root: Path) -> dict[str, Any]:
    queue, processed = root / "queue", root / "processed"
    queue.mkdir()
    processed.mkdir()
    return {"data_folder_in": str(queue), "data_folder_out": str(queue), "processed_folder": str(processed),
            "store_processed": False, "polling_interval": 0.0}


def _race(transport: str, options: dict[str, Any]) -> list[object]:
    """Send MESSAGES from one thread while another takes them as fast as it can; what it got."""
    received: list[object] = []

    def produce() -> None:
        with Connection(transport=transport, transport_options=options) as conn:
            queue = conn.SimpleQueue("sweeps")
            for i in range(MESSAGES):
                queue.put({"n": i, "pad": "x" * 4000})

    producer = threading.Thread(target=produce)
    producer.start()
    with Connection(transport=transport, transport_options=options) as conn:
        queue = conn.SimpleQueue("sweeps")
        try:
            while len(received) < MESSAGES:
                try:
                    message = queue.get(timeout=30)
                except queue.Empty:
                    break
                message.ack()
                received.append(message.payload["n"])
        finally:
            producer.join()
    return received


def test_a_consumer_racing_a_producer_gets_every_message_whole(tmp_path: Path) -> None:
    options = _options(tmp_path)

    received = _race("watasu.broker:Transport", options)

    assert sorted(received) == list(range(MESSAGES))  # none lost, none torn, none twice
    assert list((tmp_path / "processed").iterdir()) == []  # claimed messages are removed
    assert list((tmp_path / "queue").iterdir()) == []


def test_kombus_own_file_transport_tears_messages_under_the_same_race(tmp_path: Path) -> None:
    # the race above is real: the stock transport fails it (so the first test can fail)
    with pytest.raises(ValueError):  # json.JSONDecodeError of an empty or partial file
        _race("filesystem", _options(tmp_path))
