"""Prometheus metrics of one gateway process, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.signals_accepted = Counter("gateway_signals_accepted", "Signals made durable and routed", ["source", "event_class"], registry=r)
        self.signals_duplicate = Counter("gateway_signals_duplicate", "Signals recognised as duplicates and re-acked", ["source"], registry=r)
        self.rejected = Counter("gateway_inputs_rejected", "Inputs rejected and quarantined", ["source", "reason"], registry=r)
        self.heartbeats = Counter("gateway_heartbeats_received", "Heartbeats received", ["source"], registry=r)
        self.heartbeats_shed = Counter("gateway_heartbeats_shed", "Heartbeats dropped from the coalescing lane under overload", registry=r)
        self.heartbeats_coalesced = Counter("gateway_heartbeats_coalesced", "Heartbeats replaced by a newer one from the same device", registry=r)
        self.alarm_lane_depth = Gauge("gateway_alarm_lane_depth", "Signals waiting in the alarm lane", registry=r)
        self.heartbeat_lane_depth = Gauge("gateway_heartbeat_lane_depth", "Devices waiting in the heartbeat lane", registry=r)
        self.handler_errors = Counter("gateway_handler_errors", "Exceptions raised by routing listeners", ["lane"], registry=r)
        self.journal_commit_seconds = Histogram(
            "gateway_journal_commit_seconds", "Time from submit to durable commit of an intake signal",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0), registry=r,
        )
        self.link_up = Gauge("gateway_link_up", "1 while a driver link is connected", ["link"], registry=r)
        self.link_reconnects = Counter("gateway_link_reconnects", "Reconnect attempts per driver link", ["link"], registry=r)
        self.forward_delivered = Counter("gateway_forward_delivered", "Events confirmed by a command centre", ["destination"], registry=r)
        self.forward_failures = Counter("gateway_forward_failures", "Failed delivery attempts", ["destination", "kind"], registry=r)
        self.forward_dead = Counter("gateway_forward_dead_letters", "Events dead-lettered after a permanent rejection", ["destination"], registry=r)
        self.outbox_pending = Gauge("gateway_outbox_pending", "Undelivered outbox rows", ["destination"], registry=r)
        self.forward_latency = Histogram(
            "gateway_forward_seconds", "Time from receipt to confirmation by a command centre", ["destination"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100), registry=r,
        )
        self.incidents_opened = Counter("gateway_incidents_opened", "Incidents opened", ["event_class"], registry=r)
        self.task_restarts = Counter("gateway_task_restarts", "Supervised tasks restarted after a crash", ["task"], registry=r)
