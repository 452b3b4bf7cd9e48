"""WebhookService: a project's webhook endpoints and the attempts to deliver to them.

Read-only: endpoints come from the webhooks file. A key sees its own project's endpoints only
(another project's are not found), and never a signing secret.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from service.edge.auth import Authenticator
from service.edge.batch_service import DEFAULT_LIMIT, MAX_LIMIT, page_size
from service.edge.grpc_errors import translate_errors
from service.storage.tables import WebhookEndpointRow
from service.storage.webhooks import PENDING, DeliveryRecord, WebhookStore
from sluice.v1 import webhook_pb2, webhook_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs


def endpoint_message(row: WebhookEndpointRow) -> webhook_pb2.WebhookEndpoint:
    return webhook_pb2.WebhookEndpoint(id=row.id, object="webhook_endpoint", url=row.url,
                                       event_types=row.event_types.split(","), enabled=row.enabled,
                                       created_at=row.created_at,
                                       progress_thresholds=[int(t) for t in row.progress_thresholds.split(",") if t])


def delivery_message(record: DeliveryRecord) -> webhook_pb2.WebhookDelivery:
    d, e = record.delivery, record.event
    msg = webhook_pb2.WebhookDelivery(id=e.id, object="webhook_delivery", endpoint_id=d.endpoint_id,
                                      event_type=e.type, batch_id=e.batch_id, status=d.status, created_at=e.created_at)
    if d.status == PENDING:
        msg.next_attempt_at = int(d.next_attempt_at)
    if d.finished_at is not None:
        msg.finished_at = d.finished_at
    for a in record.attempts:
        attempt = msg.attempts.add(attempt=a.attempt, attempted_at=a.attempted_at, duration_ms=a.duration_ms)
        if a.status_code is not None:
            attempt.status_code = a.status_code
        if a.error is not None:
            attempt.error = a.error
    return msg


@translate_errors
class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, store: WebhookStore, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth

    async def ListWebhookEndpoints(self, request: webhook_pb2.ListWebhookEndpointsRequest,
                                   context: Context) -> webhook_pb2.ListWebhookEndpointsResponse:
        project = await self.auth.project(context.invocation_metadata())
        rows = await self.store.list_endpoints(project)
        return webhook_pb2.ListWebhookEndpointsResponse(object="list", data=[endpoint_message(r) for r in rows])

    async def ListWebhookDeliveries(self, request: webhook_pb2.ListWebhookDeliveriesRequest,
                                    context: Context) -> webhook_pb2.ListWebhookDeliveriesResponse:
        project = await self.auth.project(context.invocation_metadata())
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_LIMIT, MAX_LIMIT)
        records, has_more = await self.store.list_deliveries(project, request.endpoint_id, limit, request.after)
        out = webhook_pb2.ListWebhookDeliveriesResponse(object="list", has_more=has_more,
                                                        data=[delivery_message(r) for r in records])
        if records:
            out.first_id, out.last_id = records[0].event.id, records[-1].event.id
        return out
