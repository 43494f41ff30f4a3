"""The tier data plane the worker runs (bytes, files). Never imported by kvmanager's core."""
