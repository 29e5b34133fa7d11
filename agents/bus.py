"""The message bus: topics with publish/subscribe, direct messages, request/reply with timeouts.

Delivery is ordered per topic (every message gets the topic's next sequence number) and
at-least-once: a subscriber sees a message on every pull until it acks it, so a consumer that
dies before acking gets it again. Publishing with an idempotency key that the topic has seen
returns the first message instead of adding another, and `Inbox` skips redelivered keys on the
consumer's side, so a redelivered message has no second effect.

`BusCore` is the plain-Python state machine (unit-tested without Ray); `MessageBus` is the thin
async actor around it, named per data directory (see `message_bus`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


from config.actors import detached_actor


class BusTimeout(TimeoutError):
    pass


@dataclass
class Message:
    topic: str
    seq: int
    payload: Any
    key: str
    sender: str | None = None
    reply_to: str | None = None
    sent_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Topic:
    seq: int = 0
    messages: list[Message] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)


def direct_topic(recipient: str) -> str:
    return f"@{recipient}"


class BusCore:
    def __init__(self, retain: int = 10_000):
        self.retain = retain
        self.topics: dict[str, _Topic] = {}
        self.acked: dict[tuple[str, str], int] = {}  # (subscriber, topic) -> highest acked seq

    def subscribe(self, subscriber: str, topic: str, from_start: bool = False) -> int:
        """Start receiving a topic (from now, or from the oldest retained message)."""
        t = self.topics.setdefault(topic, _Topic())
        self.acked.setdefault((subscriber, topic), 0 if from_start else t.seq)
        return self.acked[(subscriber, topic)]

    def unsubscribe(self, subscriber: str, topic: str) -> None:
        self.acked.pop((subscriber, topic), None)

    def subscribers(self, topic: str) -> list[str]:
        return sorted(s for (s, t) in self.acked if t == topic)

    def publish(self, topic: str, payload: Any, key: str | None = None, sender: str | None = None,
                reply_to: str | None = None) -> tuple[Message, bool]:
        """(the message, whether it was a duplicate of an earlier publish with the same key)."""
        t = self.topics.setdefault(topic, _Topic())
        if key is not None and key in t.keys:
            seq = t.keys[key]
            existing = next((m for m in t.messages if m.seq == seq), None)
            if existing is not None:
                return existing, True
        t.seq += 1
        msg = Message(topic, t.seq, payload, key or uuid.uuid4().hex, sender, reply_to)
        t.messages.append(msg)
        t.keys[msg.key] = msg.seq
        if len(t.messages) > self.retain:
            dropped = t.messages[: len(t.messages) - self.retain]
            t.messages = t.messages[len(dropped):]
            for m in dropped:
                t.keys.pop(m.key, None)
        return msg, False

    def pending(self, subscriber: str, topic: str, limit: int = 100) -> list[Message]:
        """Unacked messages for a subscriber, oldest first."""
        if (subscriber, topic) not in self.acked:
            raise KeyError(f"{subscriber!r} is not subscribed to {topic!r}")
        after = self.acked[(subscriber, topic)]
        t = self.topics[topic]
        return [m for m in t.messages if m.seq > after][:limit]

    def ack(self, subscriber: str, topic: str, seq: int) -> None:
        key = (subscriber, topic)
        if key not in self.acked:
            raise KeyError(f"{subscriber!r} is not subscribed to {topic!r}")
        self.acked[key] = max(self.acked[key], seq)


class Inbox:
    """Consumer-side de-duplication: `accept(msg)` is True the first time a key is seen only."""

    def __init__(self, seen: set[str] | None = None, limit: int = 100_000):
        self.seen = set(seen or ())
        self.limit = limit

    def accept(self, message: Message | dict) -> bool:
        key = message["key"] if isinstance(message, dict) else message.key
        if key in self.seen:
            return False
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(key)
        return True


class MessageBus:
    """The bus as an async actor: pulls wait for messages, requests wait for their reply."""

    def __init__(self, retain: int = 10_000):
        self.core = BusCore(retain)
        self._changed = asyncio.Condition()
        self._replies: dict[str, asyncio.Future] = {}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def subscribe(self, subscriber: str, topic: str, from_start: bool = False) -> int:
        return self.core.subscribe(subscriber, topic, from_start)

    async def unsubscribe(self, subscriber: str, topic: str) -> None:
        self.core.unsubscribe(subscriber, topic)

    async def subscribers(self, topic: str) -> list[str]:
        return self.core.subscribers(topic)

    async def publish(self, topic: str, payload: Any, key: str | None = None, sender: str | None = None) -> dict:
        msg, duplicate = self.core.publish(topic, payload, key, sender)
        await self._notify()
        return {"seq": msg.seq, "key": msg.key, "duplicate": duplicate}

    async def send(self, recipient: str, payload: Any, key: str | None = None, sender: str | None = None) -> dict:
        """A direct message: only `recipient` receives it (on its own topic)."""
        self.core.subscribe(recipient, direct_topic(recipient), from_start=True)
        return await self.publish(direct_topic(recipient), payload, key, sender)

    async def pull(self, subscriber: str, topic: str, timeout_s: float = 0.0, limit: int = 100) -> list[dict]:
        """Unacked messages in order, waiting up to `timeout_s` for the first one."""
        if topic == direct_topic(subscriber):
            self.core.subscribe(subscriber, topic, from_start=True)
        deadline = time.monotonic() + timeout_s
        while True:
            msgs = self.core.pending(subscriber, topic, limit)
            left = deadline - time.monotonic()
            if msgs or left <= 0:
                return [m.to_dict() for m in msgs]
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    pass

    async def ack(self, subscriber: str, topic: str, seq: int) -> None:
        self.core.ack(subscriber, topic, seq)

    async def request(self, recipient: str, payload: Any, timeout_s: float = 10.0, sender: str | None = None) -> Any:
        """Send `payload` to `recipient` and wait for its `reply`; BusTimeout past `timeout_s`."""
        corr = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._replies[corr] = fut
        self.core.subscribe(recipient, direct_topic(recipient), from_start=True)
        self.core.publish(direct_topic(recipient), payload, corr, sender, reply_to=corr)
        await self._notify()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise BusTimeout(f"no reply from {recipient!r} within {timeout_s:g}s") from None
        finally:
            self._replies.pop(corr, None)

    async def reply(self, reply_to: str, payload: Any) -> bool:
        """Answer a request; False when its requester has already given up."""
        fut = self._replies.get(reply_to)
        if fut is None or fut.done():
            return False
        fut.set_result(payload)
        return True


def message_bus(data_dir: str):
    """The bus actor for this data directory (created on first use)."""
    return detached_actor(MessageBus, "orfeas-bus-" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:10])
