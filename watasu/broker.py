"""The embedded Celery broker: messages as files in the data directory, written whole.

kombu's file-system transport creates a message file empty and writes it afterwards,
while a consumer in another process takes any `*.msg` it lists without the writer's lock:
now and then a worker read an empty message, failed to decode it and exited (beat sends
a sweep every few seconds, so within minutes). Here a message is written under a name no
consumer looks at and renamed into the queue folder once complete, so a consumer only
ever sees whole messages; a consumer claims one by renaming it into the private
`processed_folder` (one rename wins), never through the shared temporary directory.

The exchange tables (which queues an exchange routes to) had the same flaw: kombu creates
the table file empty and fills it afterwards, and rewrites it in place, so a publisher
reading it meanwhile read nothing (a torn JSON document) and failed. Here a table is
changed only under a lock file of its own and replaced whole (`os.replace`): a reader sees
the old table or the new one, never a part.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add message {name!r} to the queue folder") from exc

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another consumer claimed it first
            try:
                with open(claimed, "rb") as f:
                    payload = f.read()
                if not self.store_processed:
                    os.remove(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read message {name!r} from the queue") from exc
            return loads(bytes_to_str(payload))
        raise Empty()

    def _table_change(self, exchange: str, change: Callable[[list[Any]], list[Any]]) -> None:
        """Rewrite the exchange's table as `change(rows)`, whole, under the table's lock."""
        self.control_folder.mkdir(exist_ok=True)
        table = self._exchange_file(exchange)
        with open(f"{table}.lock", "a+b") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)  # released when the file closes
            try:
                rows = [filesystem.exchange_queue_t(*row) for row in loads(bytes_to_str(table.read_bytes()))]
            except FileNotFoundError:
                rows = []
            changed = change(rows)
            if changed == rows and table.exists():
                return
            partial = table.with_name(f".{table.name}.{uuid.uuid4().hex}.partial")
            try:
                partial.write_bytes(str_to_bytes(dumps(changed)))
                os.replace(partial, table)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise ChannelError(f"Cannot write the exchange table {table}") from exc

    def get_table(self, exchange: str) -> list[Any]:
        """The table on disk, plus the bindings this process declared: kombu records a
        binding in the process's state before it writes the file, and a publisher in another
        thread that trusts the state must not find the file without it and drop the message."""
        rows = list(super().get_table(exchange))
        declared = self.state.exchanges.get(exchange, {}).get("table", [])
        rows += [row for row in map(filesystem.exchange_queue_t._make, declared) if row not in rows]
        return rows

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        row = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._table_change(exchange, lambda rows: rows if row in rows else [row, *rows])

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        row = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._table_change(exchange, lambda rows: [r for r in rows if r != row])


class Transport(filesystem.Transport):
    Channel = Channel
