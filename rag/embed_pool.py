"""Embedding actors kept warm between ingest jobs (`rag.embed_pool: warm`).

Ray Data's actor pools live as long as one job: every job started its own actors, imported torch
and loaded the model again (~13 s on 2 cores, most of a small job's overhead). This pool is a set
of named detached actors (`config.actors.detached_actor`), one name per embedder configuration and
slot, made on first use and found by every later job. The job's driver feeds them the chunk
blocks Ray Data's parse tasks produce, two calls in flight per actor, and upserts what comes back.

- An actor that has had no call for `rag.embed_pool_idle_s` seconds ends itself, so an idle
  cluster gives the memory back; the next job makes it again (and pays the load once).
- Like the other detached ORFEAS actors it reserves no CPU (an idle pool must not hold CPUs
  other work could use); its torch threads are `rag.embed_threads`, spread over the nodes.
- A call lost with its actor is sent again: by Ray when the actor restarts (a crash, a lost
  node), by the job to a new actor under the same name when it ended for good (killed, idle),
  up to `RETRIES` times. A failure inside the encoder fails the job as before.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
RETRIES = 5


class EmbedWorker:
    """One warm embedding actor: the ingest job's EmbedStage (dense + BM25), loaded once."""

    def __init__(self, stage_kwargs: dict[str, Any], idle_s: float):
        from rag.ingest import EmbedStage

        self.stage = EmbedStage(**stage_kwargs)
        self.idle_s = idle_s
        self.last_call = time.monotonic()
        self.busy = 0
        self._lock = threading.Lock()
        if idle_s > 0:
            threading.Thread(target=self._end_when_idle, daemon=True, name="embed-pool-idle").start()

    def embed(self, batch: pa.Table) -> pa.Table:
        with self._lock:
            self.busy += 1
        try:
            return self.stage(batch)
        finally:
            with self._lock:
                self.busy -= 1
                self.last_call = time.monotonic()

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(max(0.5, min(self.idle_s / 4, 30.0)))
            with self._lock:
                idle = self.busy == 0 and time.monotonic() - self.last_call >= self.idle_s
            if idle:
                log.info("embedding actor idle for %.0f s: ending it", self.idle_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def pool_key(stage_kwargs: dict[str, Any]) -> str:
    """Jobs with the same embedder configuration share actors; any other configuration gets its own."""
    ident = "|".join(f"{k}={stage_kwargs[k]}" for k in sorted(stage_kwargs))
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


class WarmPool:
    """The job side: the pool's actor handles, and the calls in flight on them. A job starts with
    the actors that exist (or one) and adds one, up to `size`, whenever all of them have their
    calls in flight (as Ray Data's pool grows); the actors it adds stay for the next job."""

    def __init__(self, size: int, stage_kwargs: dict[str, Any], idle_s: float):
        import ray

        from config.names import ACTOR_NAMESPACE

        self.stage_kwargs, self.idle_s = stage_kwargs, idle_s
        self.names = [f"orfeas-embedder-{pool_key(stage_kwargs)}-{i}" for i in range(size)]
        self.actors: dict[int, Any] = {}
        for slot, name in enumerate(self.names):
            try:
                self.actors[slot] = ray.get_actor(name, namespace=ACTOR_NAMESPACE)
            except ValueError:
                pass
        if not self.actors:
            self.actors[0] = self._actor(0)

    def _actor(self, slot: int):
        from config.actors import detached_actor

        # A restarted actor (crash, node loss) gets its calls again from Ray itself (embedding is
        # idempotent); one that ended for good is made again under its name by `map`.
        return detached_actor(EmbedWorker, self.names[slot], self.stage_kwargs, self.idle_s,
                              max_task_retries=-1, scheduling_strategy="SPREAD")

    def map(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """Embedded tables, as the actors finish them (not in input order)."""
        import ray
        from ray.exceptions import RayActorError

        in_flight: dict[Any, tuple[int, pa.Table, int]] = {}  # ref -> (slot, batch, tries)
        load = {slot: 0 for slot in self.actors}

        def submit(batch: pa.Table, tries: int = 0) -> None:
            slot = min(load, key=load.__getitem__)
            load[slot] += 1
            in_flight[self.actors[slot].embed.remote(batch)] = (slot, batch, tries)

        def collect() -> Iterator[pa.Table]:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, batch, tries = in_flight.pop(ref)
            load[slot] -= 1
            try:
                yield ray.get(ref)
            except RayActorError as e:
                if tries >= RETRIES:
                    raise
                log.warning("embedding actor %s lost (%s): sending its call again", self.names[slot], e)
                time.sleep(0.2 * (tries + 1))  # an ending actor may still hold its name for a moment
                self.actors[slot] = self._actor(slot)  # the restarted actor, or a new one by that name
                submit(batch, tries + 1)

        for batch in batches:
            if len(in_flight) >= IN_FLIGHT_PER_ACTOR * len(self.actors) and len(self.actors) < len(self.names):
                slot = next(i for i in range(len(self.names)) if i not in self.actors)
                self.actors[slot], load[slot] = self._actor(slot), 0
            while len(in_flight) >= IN_FLIGHT_PER_ACTOR * len(self.actors):
                yield from collect()
            submit(batch)
        while in_flight:
            yield from collect()
