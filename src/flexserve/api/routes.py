"""The HTTP surface, in one list."""

from __future__ import annotations

from starlette.routing import Route

from flexserve.api import admin, batches, files, openapi, ops
from flexserve.api.endpoints import responses
from flexserve.api.endpoints.chat import ChatCompletions
from flexserve.api.endpoints.completions import Completions
from flexserve.api.endpoints.embeddings import Embeddings
from flexserve.api.inference import Endpoint
from flexserve.api.pipeline import InferenceRoute
from flexserve.dashboard import routes as dashboard


def inference_endpoints() -> list[Endpoint]:
    """The endpoints served through the request pipeline (``api/pipeline.py``)."""
    return [ChatCompletions(), Completions(), responses.Responses(), Embeddings()]


def routes(endpoints: list[Endpoint]) -> list[Route]:
    return [
        # Their POSTs are answered ahead of this router (app.FlexServeApp): the hot path.
        *(Route(e.path, InferenceRoute(e), methods=["POST"]) for e in endpoints),
        Route("/v1/responses/{response_id}", responses.retrieve_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", responses.list_input_items, methods=["GET"]),
        Route("/v1/files", files.create_file, methods=["POST"]),
        Route("/v1/files", files.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", files.retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}", files.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", files.file_content, methods=["GET"]),
        Route("/v1/batches", batches.create_batch, methods=["POST"]),
        Route("/v1/batches", batches.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batches.retrieve_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", batches.cancel_batch, methods=["POST"]),
        Route("/v1/batches/{batch_id}/output", batches.batch_results, methods=["GET"]),
        Route("/v1/batches/{batch_id}/errors", batches.batch_results, methods=["GET"]),
        Route("/v1/models", ops.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", ops.retrieve_model, methods=["GET"]),
        Route("/v1/flex/status", ops.flex_status, methods=["GET"]),
        Route("/v1/organization/usage/completions", admin.usage_completions, methods=["GET"]),
        Route("/v1/organization/costs", admin.costs, methods=["GET"]),
        Route("/v1/organization/flex/savings", admin.flex_savings, methods=["GET"]),
        Route("/v1/organization/verification", admin.submit_verification, methods=["POST"]),
        Route("/v1/organization/verification", admin.verification_status, methods=["GET"]),
        Route("/dashboard", dashboard.dashboard, methods=["GET"]),
        Route("/dashboard/login", dashboard.login, methods=["POST"]),
        Route("/dashboard/logout", dashboard.logout, methods=["POST"]),
        Route("/dashboard/style.css", dashboard.style, methods=["GET"]),
        Route("/dashboard/verification/approve", dashboard.decide_verification, methods=["POST"]),
        Route("/dashboard/verification/reject", dashboard.decide_verification, methods=["POST"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    ]
