"""The HTTP surface, in one list."""

from __future__ import annotations

from starlette.routing import Route

from flexserve.api import admin, chat, ops


def routes() -> list[Route]:
    return [
        # Answered ahead of this router for POST (app.FlexServeApp): the hot path.
        Route(chat.CHAT_PATH, chat.ChatCompletionsRoute(), methods=["POST"]),
        Route("/v1/models", ops.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", ops.retrieve_model, methods=["GET"]),
        Route("/v1/flex/status", ops.flex_status, methods=["GET"]),
        Route("/v1/organization/usage/completions", admin.usage_completions, methods=["GET"]),
        Route("/v1/organization/costs", admin.costs, methods=["GET"]),
        Route("/v1/organization/flex/savings", admin.flex_savings, methods=["GET"]),
        Route("/v1/organization/verification", admin.submit_verification, methods=["POST"]),
        Route("/v1/organization/verification", admin.verification_status, methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
    ]
