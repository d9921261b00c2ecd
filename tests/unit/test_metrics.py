"""Metrics: what a Prometheus scrape actually sees, parsed back from the exposition text."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from callrouter.domain.models import EndReason
from callrouter.metrics import GuardAction, Metrics, Outcome, StoreOperation

ROUTES = ("/api/v1/numbers", "/api/v1/numbers/{id}")


def scrape(metrics: Metrics) -> dict[str, list[Sample]]:
    """Family name -> samples, as a scraper parses the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def value(metrics: Metrics, sample_name: str, **labels: str) -> float:
    family = scrape(metrics)
    matches = [
        s.value
        for samples in family.values()
        for s in samples
        if s.name == sample_name and s.labels == labels
    ]
    assert len(matches) == 1, f"{sample_name}{labels}: {matches}"
    return matches[0]


def label_values(metrics: Metrics, sample_name: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for samples in scrape(metrics).values()
        for s in samples
        if s.name == sample_name
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="1.2.3", pjproject="2.12.1", http_routes=ROUTES)


def test_every_metric_is_exposed_under_its_documented_name(metrics: Metrics) -> None:
    metrics.set_engine_slots_source(lambda: (2048, 0))
    metrics.set_engine_guard_source(dict)
    # prometheus_client adds a "<name>_created" gauge beside each counter and histogram.
    names = {name for name in scrape(metrics) if not name.endswith("_created")}
    assert names == {
        "callrouter_sip_invites_received",
        "callrouter_routing_decisions",
        "callrouter_webhook_assistant_requests",
        "callrouter_webhook_deliveries",
        "callrouter_webhook_delivery_failures",
        "callrouter_webhook_given_up",
        "callrouter_webhook_backlog",
        "callrouter_webhook_latency_seconds",
        "callrouter_sip_responses_sent",
        "callrouter_call_setup_first_response_seconds",
        "callrouter_call_setup_decision_seconds",
        "callrouter_call_setup_answer_seconds",
        "callrouter_calls_active",
        "callrouter_calls_ended",
        "callrouter_runtime_answer_seconds",
        "callrouter_call_duration_seconds",
        "callrouter_store_query_seconds",
        "callrouter_call_records_spooled",
        "callrouter_route_reloads",
        "callrouter_http_requests",
        "callrouter_http_request_duration_seconds",
        "callrouter_build_info",
        "callrouter_engine_info",
        "callrouter_engine_max_calls",
        "callrouter_engine_free_call_slots",
        "callrouter_engine_guard",
        "callrouter_engine_callback_failures",
    }


def test_labelled_series_exist_at_zero_before_any_traffic(metrics: Metrics) -> None:
    # Dashboards and rate() need every series present from the first scrape.
    outcomes = label_values(metrics, "callrouter_routing_decisions_total", "outcome")
    assert outcomes == {o.value for o in Outcome}
    reasons = label_values(metrics, "callrouter_calls_ended_total", "reason")
    assert reasons == {r.value for r in EndReason}
    assert value(metrics, "callrouter_routing_decisions_total", outcome="bridged") == 0


def test_a_call_that_is_bridged_then_hung_up(metrics: Metrics) -> None:
    metrics.invite_received()
    metrics.call_started()
    metrics.response_sent(100)
    metrics.first_response(0.0004)
    metrics.routing_decision(Outcome.BRIDGED, 0.003)
    metrics.runtime_answered(0.2)
    metrics.response_sent(200)
    metrics.caller_answered(0.21)
    assert value(metrics, "callrouter_calls_active") == 1
    metrics.call_ended(EndReason.CALLER_HANGUP, 42.0)

    assert value(metrics, "callrouter_sip_invites_received_total") == 1
    assert value(metrics, "callrouter_routing_decisions_total", outcome="bridged") == 1
    assert value(metrics, "callrouter_calls_active") == 0
    assert value(metrics, "callrouter_calls_ended_total", reason="caller_hangup") == 1
    assert value(metrics, "callrouter_sip_responses_sent_total", code="100") == 1
    assert value(metrics, "callrouter_sip_responses_sent_total", code="200") == 1
    first = "callrouter_call_setup_first_response_seconds_bucket"
    assert value(metrics, first, le="0.0005") == 1
    assert value(metrics, "callrouter_call_setup_decision_seconds_bucket", le="0.0025") == 0
    assert value(metrics, "callrouter_call_setup_decision_seconds_bucket", le="0.005") == 1
    assert value(metrics, "callrouter_call_setup_answer_seconds_count") == 1
    assert value(metrics, "callrouter_runtime_answer_seconds_sum") == pytest.approx(0.2)
    assert value(metrics, "callrouter_call_duration_seconds_bucket", le="60.0") == 1
    assert value(metrics, "callrouter_call_duration_seconds_bucket", le="30.0") == 0


def test_a_rejected_call_is_not_observed_as_a_duration(metrics: Metrics) -> None:
    metrics.call_started()
    metrics.routing_decision("unknown_number", 0.001)
    metrics.call_ended("rejected_unknown_number", None)
    assert value(metrics, "callrouter_routing_decisions_total", outcome="unknown_number") == 1
    assert value(metrics, "callrouter_calls_ended_total", reason="rejected_unknown_number") == 1
    assert value(metrics, "callrouter_call_duration_seconds_count") == 0


@pytest.mark.parametrize("code", [401, 600, 181, 0])
def test_a_status_code_outside_the_fixed_set_is_counted_as_other(
    metrics: Metrics, code: int
) -> None:
    metrics.response_sent(code)
    assert value(metrics, "callrouter_sip_responses_sent_total", code="other") == 1
    codes = label_values(metrics, "callrouter_sip_responses_sent_total", "code")
    assert str(code) not in codes


def test_unknown_outcome_is_refused_and_counts_nothing(metrics: Metrics) -> None:
    with pytest.raises(ValueError):
        metrics.routing_decision("+14155550100", 0.001)
    assert label_values(metrics, "callrouter_routing_decisions_total", "outcome") == {
        o.value for o in Outcome
    }
    assert value(metrics, "callrouter_call_setup_decision_seconds_count") == 0


def test_unknown_end_reason_is_refused_and_leaves_active_calls_alone(metrics: Metrics) -> None:
    metrics.call_started()
    with pytest.raises(ValueError):
        metrics.call_ended("hung_up_somehow", 1.0)
    assert value(metrics, "callrouter_calls_active") == 1
    assert value(metrics, "callrouter_call_duration_seconds_count") == 0


def test_unknown_store_operation_is_refused(metrics: Metrics) -> None:
    metrics.store_query(StoreOperation.BATCH_WRITE, 0.002)
    with pytest.raises(ValueError):
        metrics.store_query("vacuum", 0.1)
    ops = label_values(metrics, "callrouter_store_query_seconds_count", "operation")
    assert ops == {"read", "write", "batch_write", "ping"}
    assert value(metrics, "callrouter_store_query_seconds_count", operation="batch_write") == 1


def test_http_requests_are_labelled_by_route_template_never_by_raw_path(
    metrics: Metrics,
) -> None:
    metrics.http_request("/api/v1/numbers/{id}", "get", 200, 0.003)
    metrics.http_request("/api/v1/numbers/5f1c-raw-id", "GET", 404, 0.001)
    metrics.http_request("/api/v1/numbers", "BREW", 999, 0.001)

    templated = {"route": "/api/v1/numbers/{id}", "method": "GET", "status": "200"}
    assert value(metrics, "callrouter_http_requests_total", **templated) == 1
    raw = {"route": "other", "method": "GET", "status": "404"}
    assert value(metrics, "callrouter_http_requests_total", **raw) == 1
    odd = {"route": "/api/v1/numbers", "method": "other", "status": "other"}
    assert value(metrics, "callrouter_http_requests_total", **odd) == 1
    assert label_values(metrics, "callrouter_http_request_duration_seconds_count", "route") == {
        "/api/v1/numbers/{id}",
        "/api/v1/numbers",
        "other",
    }


def test_routes_declared_later_get_their_own_series(metrics: Metrics) -> None:
    metrics.add_http_routes(["/api/v1/calls/{id}"])
    metrics.http_request("/api/v1/calls/{id}", "DELETE", 204, 0.01)
    labels = {"route": "/api/v1/calls/{id}", "method": "DELETE", "status": "204"}
    assert value(metrics, "callrouter_http_requests_total", **labels) == 1


def test_engine_figures_are_read_from_the_callbacks_at_scrape_time(metrics: Metrics) -> None:
    in_use = [10]
    guard = {"dropped_source": 3, "engine_full": 1}
    metrics.set_engine_slots_source(lambda: (2048, in_use[0]))
    metrics.set_engine_guard_source(lambda: guard)
    assert value(metrics, "callrouter_engine_max_calls") == 2048
    assert value(metrics, "callrouter_engine_free_call_slots") == 2038

    in_use[0] = 2048
    guard["refused_method"] = 7
    assert value(metrics, "callrouter_engine_free_call_slots") == 0
    assert value(metrics, "callrouter_engine_guard_total", action="dropped_source") == 3
    assert value(metrics, "callrouter_engine_guard_total", action="refused_method") == 7
    assert value(metrics, "callrouter_engine_guard_total", action="refused_replaces") == 0
    assert label_values(metrics, "callrouter_engine_guard_total", "action") == {
        a.value for a in GuardAction
    }


def test_engine_assertions_and_source_are_exposed(metrics: Metrics) -> None:
    survived = [0]
    metrics.set_engine_assertions_source(lambda: survived[0])
    metrics.set_engine_info(pjproject="2.17", source="debian-sid-asterisk",
                            source_version="1:22.10.1", source_sha256="ab12", fallback=False)
    assert value(metrics, "callrouter_engine_assertions_total") == 0
    survived[0] = 2
    assert value(metrics, "callrouter_engine_assertions_total") == 2
    assert value(metrics, "callrouter_engine_info", pjproject="2.17", source="debian-sid-asterisk",
                 source_version="1:22.10.1", source_sha256="ab12", fallback="false") == 1


def test_engine_figures_are_absent_until_a_source_is_registered(metrics: Metrics) -> None:
    families = scrape(metrics)
    assert "callrouter_engine_max_calls" not in families
    assert "callrouter_engine_free_call_slots" not in families
    assert "callrouter_engine_guard" not in families
    assert "callrouter_engine_assertions" not in families


def test_an_unknown_guard_action_from_the_engine_is_refused(metrics: Metrics) -> None:
    metrics.set_engine_guard_source(lambda: {"dropped_source": 1, "teleported": 2})
    with pytest.raises(ValueError, match="teleported"):
        metrics.render()


def test_build_info_is_one_and_replaced_when_the_engine_version_is_known() -> None:
    metrics = Metrics(version="1.2.3")
    assert value(metrics, "callrouter_build_info", version="1.2.3", pjproject="unknown") == 1
    metrics.set_build_info(version="1.2.3", pjproject="2.12.1")
    samples = scrape(metrics)["callrouter_build_info"]
    assert [(s.labels, s.value) for s in samples] == [
        ({"version": "1.2.3", "pjproject": "2.12.1"}, 1.0)
    ]


def test_two_instances_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    a.invite_received()
    assert value(a, "callrouter_sip_invites_received_total") == 1
    assert value(b, "callrouter_sip_invites_received_total") == 0


def test_the_asgi_app_serves_the_same_exposition(metrics: Metrics) -> None:
    metrics.invite_received()
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    asyncio.run(metrics.asgi_app()(scope, receive, send))
    assert sent[0]["status"] == 200
    body = b"".join(m["body"] for m in sent[1:] if isinstance(m.get("body"), bytes))
    assert b"callrouter_sip_invites_received_total 1.0" in body


def test_the_grafana_dashboard_only_queries_metrics_that_exist(metrics: Metrics) -> None:
    # Guards docs/grafana-dashboard.json against renamed or misspelt metrics.
    metrics.set_engine_slots_source(lambda: (1, 0))
    metrics.set_engine_guard_source(dict)
    metrics.set_engine_media_source(dict)
    metrics.http_request("/api/v1/numbers", "GET", 200, 0.01)  # labelled: no series before
    body, _ = metrics.render()
    exposed = {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"callrouter_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed, sorted(queried - exposed)


def test_spooled_records_are_read_from_their_source_at_each_scrape(metrics: Metrics) -> None:
    backlog = [0]
    metrics.set_spooled_source(lambda: backlog[0])
    assert value(metrics, "callrouter_call_records_spooled") == 0
    backlog[0] = 42
    assert value(metrics, "callrouter_call_records_spooled") == 42
    metrics.route_reload("reconnect")
    assert value(metrics, "callrouter_route_reloads_total", cause="reconnect") == 1


def test_the_media_relay_is_read_from_its_source_at_each_scrape(metrics: Metrics) -> None:
    counts = {"pairs": 3, "rtp": 1200, "rtcp": 4, "dropped": 2, "dtmf_events": 1,
              "thread_pairs": 2, "thread_packets": 900}
    metrics.set_engine_media_source(lambda: counts)
    body = metrics.render()[0].decode()
    assert "callrouter_media_relayed_calls 3.0" in body
    assert "callrouter_media_relay_thread_calls 2.0" in body
    assert "callrouter_media_relay_thread_packets_total 900.0" in body
    assert 'callrouter_media_relay_packets_total{kind="rtp"} 1200.0' in body
    assert 'callrouter_media_relay_packets_total{kind="dtmf_events"} 1.0' in body
    counts["pairs"] = 0
    assert "callrouter_media_relayed_calls 0.0" in metrics.render()[0].decode()
