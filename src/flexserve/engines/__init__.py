"""Inference backends behind one interface: embedded, upstream and sim."""

from flexserve.engines.base import Delta, Engine, EngineLoad, EngineRequest, ModelCard, Usage

__all__ = ["Delta", "Engine", "EngineLoad", "EngineRequest", "ModelCard", "Usage"]
