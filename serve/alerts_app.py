"""The alert receiver as its own Serve application under /v1/alerts (no postponed annotations:
FastAPI reads the route signatures at class-decoration time). Routing is pure
(`observability.alerts`); this app holds the state and delivers what the routing returns.

    POST /v1/alerts/alertmanager              Alertmanager's webhook (bearer token when alerts.webhook_token_env)
    POST /v1/alerts/anomalies                 admin: ORFEAS's own anomaly alerts
    GET  /v1/alerts                           admin: tracked alerts
    POST /v1/alerts/{fingerprint}/ack         admin: acknowledge (stops escalation and repeats)
    GET|POST /v1/alerts/silences, DELETE /v1/alerts/silences/{id}   admin: silences

State lives in the one replica (num_replicas 1): alerts still firing are sent again by
Alertmanager, so a restarted receiver learns them back. Deliveries that fail are logged and
counted, never lost silently; a failed channel does not stop the others.
"""

import asyncio
import hmac
import logging
import os
import smtplib
import time
from typing import Any, Literal

import httpx
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from config import settings_from_dict
from config.names import ALERTS_APP
from models.errors import AuthenticationFailed, InvalidRequest, NotFound
from observability import alerts as routing
from observability import metrics
from serve.applications import replica_actor_options
from serve.http import admin, http_app, read_json
from security.auth import Principal

log = logging.getLogger(__name__)


class AnomalyAlert(BaseModel):
    """`POST /v1/alerts/anomalies`: one anomaly observability.anomaly found."""

    model_config = ConfigDict(extra="forbid")

    series: str = Field(description="What was measured, e.g. `ttft_p95{model=tiny-chat}`.")
    detail: str = Field(description="What is wrong, in words.")
    severity: Literal["critical", "warning", "info"] = "warning"
    team: str = "platform"
    status: Literal["firing", "resolved"] = "firing"
    labels: dict[str, str] = Field(default_factory=dict)


class SilenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    matchers: dict[str, str] = Field(description="Labels an alert must all have, e.g. {\"alertname\": \"X\"}.")
    duration_s: float = Field(gt=0, le=30 * 86400)
    comment: str = ""


alerts_api = http_app("ORFEAS alerts", name=ALERTS_APP)


@serve.deployment
@serve.ingress(alerts_api)
class AlertReceiver:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings_from_dict(settings)
        self.policy = self.settings.alerts
        alerts_api.state.configure(self.settings)
        self.state = routing.AlertState()
        self._lock = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=10)
        self.sent: dict[str, int] = {"slack": 0, "pagerduty": 0, "email": 0, "failed": 0}
        self._ticker: asyncio.Task | None = None

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.check_interval_s)
            try:
                async with self._lock:
                    self.state, out = routing.tick(self.state, time.time(), self.policy)
                await self._deliver(out)
            except Exception:  # the loop must outlive any one bad round
                log.exception("alert escalation round failed")

    # ------------------------------------------------------------ in

    def _check_token(self, request: Request) -> None:
        env = self.policy.webhook_token_env
        if not env:
            return
        want = os.environ.get(env, "")
        got = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if not want or not hmac.compare_digest(got.encode(), want.encode()):
            raise AuthenticationFailed("the Alertmanager webhook needs its bearer token (alerts.webhook_token_env)")

    async def _take(self, incoming: list[routing.Alert]) -> dict[str, Any]:
        self._ensure_ticker()
        for a in incoming:
            metrics.alert_received(a.source, a.severity)
        async with self._lock:
            self.state, out = routing.receive(self.state, incoming, time.time(), self.policy)
        delivered = await self._deliver(out)
        return {"object": "alerts.received", "alerts": len(incoming), "notifications": delivered}

    @alerts_api.post("/alertmanager")
    async def alertmanager(self, request: Request) -> dict:
        self._check_token(request)
        body = await read_json(request, self.settings.limits.max_body_bytes)
        try:
            incoming = routing.from_alertmanager(body)
        except routing.AlertError as e:
            raise InvalidRequest(str(e), "alerts") from None
        return await self._take(incoming)

    @alerts_api.post("/anomalies", dependencies=[Depends(admin)])
    async def anomaly(self, body: AnomalyAlert) -> dict:
        return await self._take([routing.from_anomaly(body.series, body.detail, body.severity, body.team,
                                                      body.status, body.labels)])

    # ------------------------------------------------------------ the API

    @alerts_api.get("/", dependencies=[Depends(admin)])
    async def list_alerts(self, status: Literal["firing", "resolved"] | None = None) -> dict:
        now = time.time()
        data = [routing.view(t, now, self.state) for t in self.state.alerts.values()
                if status is None or t.alert.status == status]
        return {"object": "list", "data": data, "sent": dict(self.sent)}

    @alerts_api.post("/{fp}/ack")
    async def ack(self, fp: str, principal: Principal = Depends(admin)) -> dict:
        async with self._lock:
            try:
                self.state = routing.acknowledge(self.state, fp, principal.key_id, time.time())
            except KeyError:
                raise NotFound(f"no alert {fp!r}", "fingerprint") from None
        return routing.view(self.state.alerts[fp], time.time(), self.state)

    @alerts_api.get("/silences", dependencies=[Depends(admin)])
    async def silences(self) -> dict:
        now = time.time()
        return {"object": "list", "data": [{"id": s.id, "matchers": s.matchers, "until": s.until, "by": s.by,
                                            "comment": s.comment} for s in self.state.silences if s.until > now]}

    @alerts_api.post("/silences", status_code=201)
    async def silence(self, body: SilenceRequest, principal: Principal = Depends(admin)) -> dict:
        async with self._lock:
            try:
                self.state, s = routing.add_silence(self.state, body.matchers, body.duration_s, principal.key_id,
                                                    time.time(), body.comment)
            except routing.AlertError as e:
                raise InvalidRequest(str(e), "matchers") from None
        return {"id": s.id, "matchers": s.matchers, "until": s.until, "by": s.by, "comment": s.comment}

    @alerts_api.delete("/silences/{silence_id}", dependencies=[Depends(admin)])
    async def unsilence(self, silence_id: str) -> dict:
        async with self._lock:
            try:
                self.state = routing.remove_silence(self.state, silence_id)
            except KeyError:
                raise NotFound(f"no silence {silence_id!r}", "id") from None
        return {"id": silence_id, "deleted": True}

    # ------------------------------------------------------------ out

    def _for_team(self, table: dict[str, str], team: str) -> str | None:
        return table.get(team) or table.get("default")

    async def _deliver(self, notifications: list[routing.Notification]) -> int:
        results = await asyncio.gather(*(self._send(n) for n in notifications), return_exceptions=True)
        ok = 0
        for n, r in zip(notifications, results):
            if isinstance(r, BaseException) or r is False:
                self.sent["failed"] += 1
                log.error("alert %s to %s (team %s) not delivered: %r", n.kind, n.channel, n.team, r)
            else:
                self.sent[n.channel] += 1
                ok += 1
        return ok

    async def _send(self, n: routing.Notification) -> bool:
        if n.channel == "slack":
            url = self._for_team(self.policy.slack_webhooks, n.team)
            if not url:
                raise RuntimeError(f"no Slack webhook for team {n.team!r} (alerts.slack_webhooks)")
            (await self._client.post(url, json=routing.slack_message(n))).raise_for_status()
            return True
        if n.channel == "pagerduty":
            env = self._for_team(self.policy.pagerduty_routing_keys, n.team)
            key = os.environ.get(env or "", "")
            if not key:
                raise RuntimeError(f"no PagerDuty routing key for team {n.team!r} (alerts.pagerduty_routing_keys)")
            for event in routing.pagerduty_events(n, key):
                (await self._client.post(self.policy.pagerduty_url, json=event)).raise_for_status()
            return True
        to = self.policy.email.to.get(n.team) or self.policy.email.to.get("default")
        if not to:
            raise RuntimeError(f"no email address for team {n.team!r} (alerts.email.to)")
        await asyncio.to_thread(self._smtp, routing.email_message(n, self.policy.email.sender, to))
        return True

    def _smtp(self, msg) -> None:
        e = self.policy.email
        with smtplib.SMTP(e.smtp_host, e.smtp_port, timeout=10) as smtp:
            if e.starttls:
                smtp.starttls()
            if e.username_env:
                smtp.login(os.environ.get(e.username_env, ""), os.environ.get(e.password_env, ""))
            smtp.send_message(msg)



def build_app(args: dict[str, Any]):
    """Serve application builder for the alert receiver (see serve.applications)."""
    settings = settings_from_dict(args["settings"])
    return AlertReceiver.options(
        name="AlertReceiver", num_replicas=1, max_ongoing_requests=64,
        ray_actor_options=replica_actor_options(settings.serve, num_cpus=0),
    ).bind(settings.to_dict())
