"""The embedded broker hands a consumer only whole messages.

kombu's own file-system transport creates a message file empty and fills it afterwards; a
worker polling the folder could take it in between, fail to decode it and exit, taking
`make run` down with it. A consumer looks at the folder in the middle of a write here
(the window is opened on purpose, so the outcome never depends on thread timing), and a
producer and a consumer race on one folder.
"""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection
from kombu.transport import filesystem

from watasu import broker

MESSAGES = 3000


def _options(root: Path) -> dict[str, Any]:
    queue, processed = root / "queue", root / "processed"
    queue.mkdir()
    processed.mkdir()
    # The exchange tables too, as the settings keep them in the data directory: kombu's
    # default is `control/` in the working directory, shared by every test and run there.
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(processed),
        "control_folder": str(root / "control"),
        "store_processed": False,
        "polling_interval": 0.0,
    }


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


def _look_while_writing(monkeypatch: pytest.MonkeyPatch, module: Any, transport: str, root: Path) -> object:
    """Put one message; while it is being written (file open, bytes not yet in it), let another
    connection's consumer take what it can. What that consumer got: a payload, `Empty` or the error."""
    options = _options(root)
    seen: list[object] = []
    with (
        Connection(transport=transport, transport_options=options) as producer,
        Connection(transport=transport, transport_options=options) as consumer,
    ):
        encode = module.str_to_bytes

        def encode_then_look(text: str) -> bytes:
            try:
                seen.append(consumer.default_channel._get("sweeps"))
            except Empty as exc:
                seen.append(type(exc))
            except ValueError as exc:  # json.JSONDecodeError of the empty file
                seen.append(exc)
            return encode(text)

        monkeypatch.setattr(module, "str_to_bytes", encode_then_look)
        producer.default_channel._put("sweeps", {"n": 1})
        monkeypatch.setattr(module, "str_to_bytes", encode)
        assert len(seen) == 1, "the write window was never opened"
        try:
            after = consumer.default_channel._get("sweeps")
        except Empty:
            after = Empty
    return seen[0], after


def test_a_consumer_looking_during_a_write_sees_nothing_then_the_whole_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    during, after = _look_while_writing(monkeypatch, broker, "watasu.broker:Transport", tmp_path)

    assert during is Empty
    assert after == {"n": 1}


def test_kombus_own_file_transport_hands_out_a_message_being_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the window is real: the stock transport gives the consumer the empty file (so the test above can fail)
    during, after = _look_while_writing(monkeypatch, filesystem, "filesystem", tmp_path)

    assert isinstance(during, ValueError)
    assert after is Empty  # and the message is gone


def test_a_publisher_reading_an_exchange_table_while_it_changes_sees_a_whole_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # given a table with one binding, and a second binding being written
    options = _options(tmp_path)
    with (
        Connection(transport="watasu.broker:Transport", transport_options=options) as binder,
        Connection(transport="watasu.broker:Transport", transport_options=options) as reader,
    ):
        binder.default_channel._queue_bind("jobs", "first", "", "first")
        seen: list[object] = []
        encode = broker.str_to_bytes

        def encode_then_read(text: str) -> bytes:
            # when a publisher reads the table while the new one is being written
            try:
                seen.append(sorted(row.queue for row in reader.default_channel.get_table("jobs")))
            except ValueError as exc:  # a torn JSON document
                seen.append(exc)
            return encode(text)

        monkeypatch.setattr(broker, "str_to_bytes", encode_then_read)
        binder.default_channel._queue_bind("jobs", "second", "", "second")
        monkeypatch.setattr(broker, "str_to_bytes", encode)

        # then it read the old table whole, and afterwards the new one has both
        assert seen == [["first"]]
        assert sorted(row.queue for row in reader.default_channel.get_table("jobs")) == ["first", "second"]
