"""Accounts: organizations, projects, API keys, verification.

``Accounts`` is the one way in; it turns an API key into the ``Principal`` a
request acts for. Keys are stored only as hashes (``accounts.keys``).
"""

from __future__ import annotations

from flexserve.accounts.service import AccountError, Accounts, Organization, Principal

__all__ = ["AccountError", "Accounts", "Organization", "Principal"]
