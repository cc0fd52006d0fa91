"""Data forwarding ("routing rules") through the SDK, both signers, pushed to a local HTTP receiver.

Rules and HTTP_FORWARDING actions are managed with the SDK; a paho device reports
properties and ``receiver`` (a ThreadingHTTPServer on 127.0.0.1) records what ioda POSTs.
Rules are project-wide, so every test deletes its rules and filters pushes by its own device.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkiotda.v5.model import (
    AddActionReq, AddRuleReq, ChannelDetail, CreateRoutingRuleRequest, CreateRuleActionRequest,
    DeleteRoutingRuleRequest, DeleteRuleActionRequest, HttpForwarding, ListRoutingRulesRequest,
    ListRuleActionsRequest, RoutingRuleSubject, ShowRoutingRuleRequest, ShowRuleActionRequest,
    ShowDeviceRequest, UpdateActionReq, UpdateRoutingRuleRequest, UpdateRuleActionRequest, UpdateRuleReq,
)

from ioda_testlib import (
    assert_platform_time, create_product, expect_client_error, new_device, start_sim_device, uniq,
    wait_until,
)

SERVICE = "Temperature"  # temp: decimal -40..120, mode: enum auto|manual, label: string, count: int
PUSH_TIMEOUT = 10.0
QUIET = 1.0  # how long "nothing arrives" is watched


class Receiver:
    """Records every POST (path, headers, parsed JSON body) and answers 200."""

    def __init__(self):
        self.posts: list[dict] = []
        self.lock, receiver = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.posts.append({"path": self.path, "headers": headers, "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/push"

    def matching(self, pred) -> list[dict]:
        with self.lock:
            return [p for p in self.posts if pred(p["body"])]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def product(client):
    return create_product(client)


@pytest.fixture
def rules(client):
    """``rules(**AddRuleReq kwargs)`` -> CreateRoutingRuleResponse; every rule is deleted at teardown."""
    created: list[str] = []

    def make(**kwargs):
        kwargs.setdefault("rule_name", uniq("rule"))
        kwargs.setdefault("subject", RoutingRuleSubject(resource="device.property", event="report"))
        kwargs.setdefault("app_type", "GLOBAL")
        resp = client.create_routing_rule(CreateRoutingRuleRequest(body=AddRuleReq(**kwargs)))
        created.append(resp.rule_id)
        return resp

    yield make
    for rule_id in created:
        try:
            client.delete_routing_rule(DeleteRoutingRuleRequest(rule_id=rule_id))
        except ClientRequestException as e:  # already deleted by the test
            if e.status_code != 404:
                raise


def _http(url: str) -> ChannelDetail:
    return ChannelDetail(http_forwarding=HttpForwarding(url=url))


def _add_action(client, rule_id: str, url: str):
    return client.create_rule_action(CreateRuleActionRequest(
        body=AddActionReq(rule_id=rule_id, channel="HTTP_FORWARDING", channel_detail=_http(url))))


def _activate(client, rule_id: str):
    return client.update_routing_rule(UpdateRoutingRuleRequest(rule_id=rule_id, body=UpdateRuleReq(active=True)))


def _forwarding(client, rules, receiver, **rule_kwargs) -> str:
    rule = rules(**rule_kwargs)
    _add_action(client, rule.rule_id, receiver.url)
    assert _activate(client, rule.rule_id).active is True
    return rule.rule_id


def _report(dev, properties: dict) -> None:
    assert dev.report_properties([{"service_id": SERVICE, "properties": properties}]) == 0


def _of_device(device_id: str):
    """Envelopes about ``device_id`` (other tests' devices may report while a rule is active)."""
    return lambda b: isinstance(b, dict) and b.get("notify_data", {}).get("header", {}).get("device_id") == device_id


def _wait_posts(receiver, pred) -> list[dict]:
    return wait_until(lambda: receiver.matching(pred), PUSH_TIMEOUT,
                      what=lambda: f"a push; received so far: {receiver.posts}")


def test_rule_crud(client, rules):
    name = uniq("rule")
    created = rules(rule_name=name, description="to the receiver",
                    select="notify_data.header.device_id AS id",
                    where="notify_data.body.services[0].properties.temp > 30")
    assert created.rule_id and created.active is False, "new rules are inactive"
    assert (created.rule_name, created.app_type) == (name, "GLOBAL")
    assert (created.subject.resource, created.subject.event) == ("device.property", "report")

    shown = client.show_routing_rule(ShowRoutingRuleRequest(rule_id=created.rule_id))
    assert shown.to_json_object() == created.to_json_object()

    updated = _activate(client, created.rule_id)
    assert updated.active is True
    assert (updated.select, updated.where) == (created.select, created.where), "SQL not in the update is kept"
    # Huawei: "select and where must be passed together" when changing the SQL.
    updated = client.update_routing_rule(UpdateRoutingRuleRequest(rule_id=created.rule_id, body=UpdateRuleReq(
        select="notify_data.header.node_id AS n", where="notify_data.body.services[0].properties.temp < 0")))
    assert updated.select == "notify_data.header.node_id AS n" and updated.where.endswith("temp < 0")
    shown = client.show_routing_rule(ShowRoutingRuleRequest(rule_id=created.rule_id))
    assert shown.active is True and shown.where == updated.where

    newer = rules(subject=RoutingRuleSubject(resource="device.property", event="report"))
    listed = client.list_routing_rules(ListRoutingRulesRequest(resource="device.property", event="report"))
    ids = [r.rule_id for r in listed.rules]
    assert listed.count == len(ids) >= 2
    assert ids.index(newer.rule_id) < ids.index(created.rule_id), f"newest first: {ids}"
    active = client.list_routing_rules(ListRoutingRulesRequest(
        resource="device.property", event="report", active=True)).rules
    assert created.rule_id in {r.rule_id for r in active} and newer.rule_id not in {r.rule_id for r in active}
    other = client.list_routing_rules(ListRoutingRulesRequest(resource="device.message", event="report")).rules
    assert created.rule_id not in {r.rule_id for r in other or []}

    client.delete_routing_rule(DeleteRoutingRuleRequest(rule_id=created.rule_id))
    expect_client_error(lambda: client.show_routing_rule(ShowRoutingRuleRequest(rule_id=created.rule_id)),
                        status=404)


def test_rule_unknown_subject_is_400(client, rules):
    expect_client_error(lambda: rules(subject=RoutingRuleSubject(resource="device.property", event="delete")),
                        status=400, error_code="IOTDA.000006")


@pytest.mark.parametrize("clause,sql", [("where", "temp >"), ("select", "notify_data.header.device_id AS")])
def test_rule_bad_sql_is_400(client, rules, clause, sql):
    exc = expect_client_error(lambda: rules(**{clause: sql}), status=400, error_code="IOTDA.000006")
    assert clause in exc.error_msg.lower() and re.search(r"character \d+", exc.error_msg), exc.error_msg
    # The same check applies on update.
    rule_id = rules().rule_id
    exc = expect_client_error(lambda: client.update_routing_rule(UpdateRoutingRuleRequest(
        rule_id=rule_id, body=UpdateRuleReq(**{clause: sql}))), status=400, error_code="IOTDA.000006")
    assert re.search(r"character \d+", exc.error_msg), exc.error_msg


def test_action_crud(client, rules, receiver):
    rule_id = rules().rule_id
    created = _add_action(client, rule_id, receiver.url)
    assert created.action_id and created.rule_id == rule_id
    assert created.channel == "HTTP_FORWARDING"
    assert created.channel_detail.http_forwarding.url == receiver.url

    shown = client.show_rule_action(ShowRuleActionRequest(action_id=created.action_id))
    assert shown.to_json_object() == created.to_json_object()
    listed = client.list_rule_actions(ListRuleActionsRequest(rule_id=rule_id))
    assert [a.action_id for a in listed.actions] == [created.action_id] and listed.count == 1

    new_url = receiver.url + "/v2"
    updated = client.update_rule_action(UpdateRuleActionRequest(
        action_id=created.action_id, body=UpdateActionReq(channel="HTTP_FORWARDING", channel_detail=_http(new_url))))
    assert updated.channel_detail.http_forwarding.url == new_url
    shown = client.show_rule_action(ShowRuleActionRequest(action_id=created.action_id))
    assert shown.channel_detail.http_forwarding.url == new_url

    client.delete_rule_action(DeleteRuleActionRequest(action_id=created.action_id))
    expect_client_error(lambda: client.show_rule_action(ShowRuleActionRequest(action_id=created.action_id)),
                        status=404)
    assert not client.list_rule_actions(ListRuleActionsRequest(rule_id=rule_id)).actions


@pytest.mark.parametrize("url", ["not a url", "ftp://x"])
def test_action_bad_url_is_400(client, rules, url):
    rule_id = rules().rule_id
    expect_client_error(lambda: _add_action(client, rule_id, url), status=400, error_code="IOTDA.000006")
    assert not client.list_rule_actions(ListRuleActionsRequest(rule_id=rule_id)).actions
    action_id = _add_action(client, rule_id, "http://127.0.0.1:9/push").action_id
    expect_client_error(lambda: client.update_rule_action(UpdateRuleActionRequest(
        action_id=action_id, body=UpdateActionReq(channel="HTTP_FORWARDING", channel_detail=_http(url)))),
        status=400, error_code="IOTDA.000006")
    shown = client.show_rule_action(ShowRuleActionRequest(action_id=action_id))
    assert shown.channel_detail.http_forwarding.url == "http://127.0.0.1:9/push"


def test_action_unknown_rule_is_404(client, receiver):
    expect_client_error(lambda: _add_action(client, uniq("no-rule"), receiver.url), status=404)


def test_push_property_report_envelope(client, rules, receiver, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    _forwarding(client, rules, receiver)

    props = {"temp": 25.5, "mode": "auto", "label": "kitchen", "count": 7}
    _report(dev, props)
    (post,) = _wait_posts(receiver, _of_device(device_id))
    body = post["body"]
    assert post["path"] == "/push"
    assert post["headers"].get("x-ioda-message-id"), f"no X-Ioda-Message-Id: {post['headers']}"
    assert (body["resource"], body["event"]) == ("device.property", "report")
    assert_platform_time(body.get("event_time"), "event_time")
    header = body["notify_data"]["header"]
    assert header["device_id"] == device_id
    assert header["node_id"] == client.show_device(ShowDeviceRequest(device_id=device_id)).node_id
    assert header["product_id"] == product.product_id
    services = body["notify_data"]["body"]["services"]
    assert services[0]["service_id"] == SERVICE
    assert services[0]["properties"] == props


def test_push_where_filters(client, rules, receiver, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    _forwarding(client, rules, receiver, where="notify_data.body.services[0].properties.temp > 30")
    mine = _of_device(device_id)

    _report(dev, {"temp": 20.5})
    time.sleep(QUIET)
    assert receiver.matching(mine) == [], "a report that fails the where clause is not pushed"

    _report(dev, {"temp": 35.5})
    (post,) = _wait_posts(receiver, mine)
    assert post["body"]["notify_data"]["body"]["services"][0]["properties"] == {"temp": 35.5}
    time.sleep(QUIET)
    assert len(receiver.matching(mine)) == 1


def test_push_select_shapes_body(client, rules, receiver, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    _forwarding(client, rules, receiver,
                select="notify_data.header.device_id AS id, notify_data.body.services[0].properties.mode AS v")

    _report(dev, {"temp": 21.0, "mode": "manual"})
    (post,) = _wait_posts(receiver, lambda b: isinstance(b, dict) and b.get("id") == device_id)
    assert post["body"] == {"id": device_id, "v": "manual"}
    assert post["headers"].get("x-ioda-message-id")


def test_deleted_rule_stops_pushing(client, rules, receiver, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    rule_id = _forwarding(client, rules, receiver)
    mine = _of_device(device_id)
    _report(dev, {"temp": 22.0})
    _wait_posts(receiver, mine)

    client.delete_routing_rule(DeleteRoutingRuleRequest(rule_id=rule_id))
    assert not client.list_rule_actions(ListRuleActionsRequest(rule_id=rule_id)).actions, "actions go with the rule"
    _report(dev, {"temp": 23.0})
    time.sleep(QUIET)
    assert len(receiver.matching(mine)) == 1, "no push after the rule is deleted"
