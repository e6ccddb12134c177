"""Billing: usage records now; prices, cost arithmetic, budgets and rate limits later."""
