"""Tier queues, admission, deadlines, preemption and fairness: pure asyncio."""

from flexserve.scheduler.scheduler import Scheduler, Ticket

__all__ = ["Scheduler", "Ticket"]
