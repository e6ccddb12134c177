"""``/dashboard``: what an organization spent and saved, in the browser,
served by the gateway itself (no build step, no script)."""
