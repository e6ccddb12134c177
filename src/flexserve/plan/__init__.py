"""`flexserve plan`: how much flex a fleet can sell beside its default
traffic, found by running the scheduler against the sim engine on a virtual
clock (``clock.py``), hour by hour of a day (``simulate.py``)."""
