"""What FlexServe tells its operators besides metrics: structured logs
(``logs.py``) and the request log (``requests.py``)."""
