"""Locust load tests: the users (locustfile.py) and the answer checks they apply (checks.py)."""
